"""Pieces of the training loop that the CLI runs do not reach: every loss, samplers' resume."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed_cl.config import Config
from distributed_cl.losses import LOSSES
from distributed_cl.models.image import ImageEncoderOptions
from distributed_cl.optim import warmup_cosine
from distributed_cl.samplers import DistributedMPerClassSampler, DistributedRandomBatchSampler
from distributed_cl.tasks import ContrastiveModel
from distributed_cl.tasks.image import ImageTask

LOSS_CONFIGS = {name: {} for name in LOSSES} | {
    "ntxent_decoupled_hard": {"name": "ntxent", "decoupled": True, "hard_negative_beta": 0.5},
    "infonce_decoupled": {"name": "infonce", "decoupled": True},
    "siglip_tiled": {"name": "siglip", "chunk_size": 3, "init_scale": 5.0, "init_bias": -1.0},
}


@pytest.mark.parametrize("loss", LOSS_CONFIGS)
@pytest.mark.parametrize("encoder", ["small_cnn", "resnet18_small"])
def test_every_configured_loss_trains_through_the_model(loss, encoder):
    torch.manual_seed(0)
    config = Config(model=ImageEncoderOptions(encoder=encoder, width=8, pool=2, projection_hidden=16, projection_dim=8))
    options = {"name": loss} | LOSS_CONFIGS[loss]
    kind = LOSSES[options["name"]]
    options = kind(**options, **({"temperature": 0.2} if "temperature" in kind.model_fields else {}))
    model = ContrastiveModel(ImageTask.build_towers(config), options.build(), options)
    batch = {"a": torch.rand(8, 1, 28, 28), "b": torch.rand(8, 1, 28, 28), "labels": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])}
    if options.needs_is_same:
        batch["is_same"] = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1])
    loss_value, stats = model(batch)
    loss_value.backward()
    assert torch.isfinite(loss_value) and loss_value > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert stats.anchors in (8, 16) and stats.anchors_without_positive == 0 and not stats.empty  # rows, or both views
    assert tuple(model.loss_fn.logged()) == type(model.loss_fn).log_keys  # what metrics.csv's columns say it logs


def test_warmup_then_cosine_to_zero():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert sched.get_last_lr()[0] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: DistributedMPerClassSampler(np.repeat(np.arange(8), 12), 4, 16, 2, r, seed=3),
        lambda r: DistributedRandomBatchSampler(100, 16, 2, r, seed=3),
    ],
)
def test_start_batch_resumes_mid_epoch_where_the_plan_left_off(make):
    sampler = make(0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == full[3:]


def test_random_batch_sampler_splits_each_global_batch_over_ranks():
    per_rank = []
    for r in range(4):
        s = DistributedRandomBatchSampler(103, 20, 4, r, seed=1)
        s.set_epoch(0)
        per_rank.append(list(s))
    assert {len(b) for b in per_rank} == {103 // 20}
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 5 * 20 and all(len(b) == 5 for bs in per_rank for b in bs)
    with pytest.raises(ValueError, match="not divisible by num_replicas=3"):
        DistributedRandomBatchSampler(100, 16, 3, 0)


def test_small_cnn_features_are_the_full_map_and_its_head_pools_them():
    """kNN and the export see the whole 7x7 map; the projection head sees it pooled to pool x pool."""
    from distributed_cl.models import GridPool, build_encoder, build_head

    config = ImageEncoderOptions(encoder="small_cnn", width=4, pool=3, projection_hidden=16, projection_dim=8)
    encoder = build_encoder(config).eval()
    x = torch.rand(5, 1, 28, 28)
    features = encoder(x)
    assert features.shape == (5, 16 * 7 * 7)
    grid = torch.nn.Sequential(*list(encoder)[:-1])(x)  # the conv blocks alone: (5, 16, 7, 7)
    torch.testing.assert_close(features, grid.flatten(1))
    torch.testing.assert_close(GridPool(16, 3)(features), torch.nn.functional.adaptive_avg_pool2d(grid, 3).flatten(1))
    head = build_head(encoder, config)
    assert head[1].in_features == 16 * 3 * 3 and head.eval()(features).shape == (5, 8)


@pytest.mark.parametrize("module,absent", [("distributed_cl.callbacks", "torch"), ("distributed_cl.trackers", "torch"),
                                           ("distributed_cl.trackers", "mlflow"), ("distributed_cl.trackers", "wandb"),
                                           ("distributed_cl.report", "torch"), ("distributed_cl.report", "matplotlib"),
                                           ("distributed_cl.train_loop", "torchvision"),
                                           ("distributed_cl.train_loop", "distributed_cl.callbacks")])
def test_what_each_ray_train_process_imports_leaves_out_what_it_does_not_need(module, absent):
    """Ray Train's controller imports the callbacks' module, a worker the train loop's, each in a
    new process every run: torch (for the controller) and torchvision (for workers with no
    torchvision model) would add seconds of CPU to every run's start."""
    code = f"import sys, {module}; print({absent!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
