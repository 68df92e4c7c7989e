"""The sampler inside a real 2-worker Ray Train TorchTrainer, feeding SupConLoss."""

import json
from collections import Counter
from pathlib import Path

import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_data_loader, prepare_model
from torch.utils.data import DataLoader, TensorDataset

from distributed_cl.losses import SupConLoss
from distributed_cl.samplers import DistributedMPerClassSampler

LABELS = [c for c in range(8) for _ in range(10)]  # 80 samples, 8 classes
M, GLOBAL_BATCH = 4, 16


def train_loop(config):
    context = ray.train.get_context()
    labels = torch.tensor(config["labels"])
    features = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0)) + labels[:, None]
    dataset = TensorDataset(torch.arange(len(labels)), features, labels)
    sampler = DistributedMPerClassSampler(labels, m=config["m"], global_batch_size=config["global_batch"])
    loader = prepare_data_loader(DataLoader(dataset, batch_sampler=sampler), add_dist_sampler=False)
    model = prepare_model(torch.nn.Linear(6, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = SupConLoss(temperature=0.1)
    record = {"replicas": sampler.num_replicas, "len": len(loader), "steps": []}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for index, x, y in loader:
            loss, stats = loss_fn(model(x), y, return_stats=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            record["steps"].append({"epoch": epoch, "index": index.tolist(), "without_positive": stats.anchors_without_positive, "anchors": stats.anchors})
    Path(config["out"], f"rank{context.get_world_rank()}.json").write_text(json.dumps(record))


def test_sampler_in_two_worker_torch_trainer(local_ray, tmp_path):
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"labels": LABELS, "m": M, "global_batch": GLOBAL_BATCH, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="sampler", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["replicas"] for r in ranks] == [2, 2]  # defaults came from Ray Train's context
    groups = 8 * -(-10 // M)  # epoch rule: sum over classes of ceil(n_c / m) groups, C per batch
    assert ranks[0]["len"] == ranks[1]["len"] == groups // (GLOBAL_BATCH // M)
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 2 * ranks[0]["len"]
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert len(step0["index"]) == len(step1["index"]) == GLOBAL_BATCH // 2
        union = step0["index"] + step1["index"]
        assert len(set(union)) == GLOBAL_BATCH
        assert sorted(Counter(LABELS[i] for i in union).values()) == [M] * (GLOBAL_BATCH // M)
        assert step0["anchors"] == GLOBAL_BATCH and step0["without_positive"] == step1["without_positive"] == 0
    epochs = [[s["index"] for s in ranks[0]["steps"] if s["epoch"] == e] for e in (0, 1)]
    assert epochs[0] != epochs[1]  # set_epoch reached the sampler
