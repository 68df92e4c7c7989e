"""The per-worker training loop. Runs inside each Ray Train worker; knows nothing of the driver.

Read top to bottom: build data, model and optimizer; restore the latest checkpoint if there is
one; train with periodic metrics and checkpoints; evaluate each epoch; at the end compare the
trained encoder with the same encoder untrained and with raw pixels, and export it.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import prepare_data_loader, prepare_model
from torch import nn
from torch.utils.data import DataLoader

from distributed_cl import distributed as dist_utils
from distributed_cl.config import LABELLED_LOSSES, Config, LossConfig, OptimConfig
from distributed_cl.data.images import TwoViews, load_images, to_float, two_view_transform
from distributed_cl.evaluate import embed, knn_top1
from distributed_cl.losses import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss
from distributed_cl.models import ContrastiveModel, build_encoder, projection_head, save_encoder
from distributed_cl.samplers import DistributedMPerClassSampler, DistributedRandomBatchSampler

STATE_FILE = "state.pt"
ENCODER_FILE = "encoder.pt"


# ----------------------------------------------------------------------------- components


def _pair_views(loss_fn, z_a, z_b, labels):
    return loss_fn(z_a, z_b)


def _supervised_views(loss_fn, z_a, z_b, labels):
    return loss_fn(torch.cat([z_a, z_b]), torch.cat([labels, labels]))


def build_objective(config: LossConfig):
    """The loss module and how it consumes (two views' embeddings, labels)."""
    if config.name == "ntxent":
        return NTXentLoss(config.temperature), _pair_views
    if config.name == "infonce":
        return InfoNCELoss(config.temperature), _pair_views
    if config.name == "clip":
        return ClipLoss(config.temperature), _pair_views
    if config.name == "supcon":
        return SupConLoss(config.temperature), _supervised_views
    raise ValueError(f"loss.name: unknown loss {config.name!r}")


def build_optimizer(config: OptimConfig, params) -> torch.optim.Optimizer:
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base learning rate, then cosine decay to zero at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _temperature(loss_fn: nn.Module) -> float:
    """The temperature in use: CLIP learns its own."""
    return 1 / loss_fn.scale.item() if isinstance(loss_fn, ClipLoss) else loss_fn.temperature


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _all_ranks(obj, world: int) -> list:
    """Every rank's `obj`, in rank order."""
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def _sharded_embed(encoder: nn.Module, images: torch.Tensor, rank: int, world: int, device) -> torch.Tensor:
    """Each rank embeds a contiguous shard; the gather (on the device: NCCL needs CUDA tensors)
    returns all features on every rank."""
    bounds = np.linspace(0, len(images), world + 1).astype(int)
    local = embed(encoder, to_float(images[bounds[rank] : bounds[rank + 1]])).to(device)
    return dist_utils.all_gather_no_grad(local, sizes=np.diff(bounds).tolist()).cpu()


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(raw_config: dict) -> None:
    config = Config.from_dict(raw_config)
    data_cfg, train_cfg = config.data, config.train
    torch.set_num_threads(train_cfg.threads_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # Data: a batch sampler (this rank's slice of every global batch), loaded without Ray's
    # distributed sampler, which would replace it.
    data = load_images(data_cfg)
    train_set = TwoViews(data.train_images, data.train_labels,
                         two_view_transform(data.image_size, data_cfg.crop_scale_min, data_cfg.jitter))
    if config.loss.name in LABELLED_LOSSES:
        sampler = DistributedMPerClassSampler(data.train_labels, config.loss.m, train_cfg.global_batch_size,
                                              world, rank, seed=train_cfg.seed)
    else:
        sampler = DistributedRandomBatchSampler(len(train_set), train_cfg.global_batch_size, world, rank,
                                                seed=train_cfg.seed)
    loader = prepare_data_loader(DataLoader(train_set, batch_sampler=sampler), add_dist_sampler=False)
    g = torch.Generator().manual_seed(train_cfg.seed)
    bank = torch.randperm(len(data.train_images), generator=g)[: data_cfg.eval_bank_size or None]
    test = torch.arange(len(data.test_images))[: data_cfg.eval_test_size or None]

    def knn(encoder: nn.Module) -> float:
        bank_features = _sharded_embed(encoder, data.train_images[bank], rank, world, device)
        test_features = _sharded_embed(encoder, data.test_images[test], rank, world, device)
        return knn_top1(bank_features, data.train_labels[bank], test_features, data.test_labels[test], train_cfg.knn_k)

    # Model, loss and optimizer. Same seed on every rank: identical initial weights.
    torch.manual_seed(train_cfg.seed)
    encoder = build_encoder(config.model)
    head = projection_head(encoder.out_dim, config.model.projection_hidden, config.model.projection_dim)
    loss_fn, objective = build_objective(config.loss)
    model = prepare_model(ContrastiveModel(encoder, head, loss_fn, objective))
    net: ContrastiveModel = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(config.optim, model.parameters())
    total_steps = train_cfg.max_steps or train_cfg.epochs * len(sampler)
    scheduler = warmup_cosine(optimizer, config.optim.warmup_steps, total_steps)
    torch.manual_seed(train_cfg.seed * 10_000 + rank)  # augmentations differ per rank

    step = epoch = batch_in_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: weights, optimizer, schedule, sampler position, every rank's RNG
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        _set_rng_state(state["rng"][rank])
    start_step = step
    last_knn = float("nan")

    def report(metrics: dict, save: bool = False, final: bool = False) -> None:
        """Every rank reports; with `save`, rank 0 attaches a checkpoint (every rank's RNG inside)."""
        metrics = {"step": step, "epoch": epoch, "start_step": start_step, "knn_top1": last_knn, **metrics}
        if not save:
            ray.train.report(metrics)
            return
        rng_states = _all_ranks(_rng_state(), world)
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                        "batch_in_epoch": batch_in_epoch, "rng": rng_states}, os.path.join(d, STATE_FILE))
            if final:
                save_encoder(net.encoder, config.model, 1, os.path.join(d, ENCODER_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    use_bf16 = device.type == "cuda"
    window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
    while step < total_steps:
        sampler.set_epoch(epoch, start_batch=batch_in_epoch)
        for view_a, view_b, labels in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(view_a, view_b, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            window_loss += loss.item()
            window_steps += 1
            window_samples += len(view_a)

            save = step % train_cfg.checkpoint_every == 0 and step < total_steps
            if save or step % train_cfg.log_every == 0 or step == total_steps:
                # the mean over ranks of the returned losses is the global loss
                mean_loss = dist_utils.all_reduce_sum(torch.tensor([window_loss], device=device)).item() / world
                stats = net.loss_fn.last_stats
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": mean_loss / window_steps,
                    "lr": scheduler.get_last_lr()[0],
                    "temperature": _temperature(net.loss_fn),
                    "samples_per_s": window_samples * world / elapsed,
                    "anchors_without_positive": stats.anchors_without_positive,
                    "mean_positives": stats.mean_positives,
                    "empty_batches": net.loss_fn.empty_batches,
                }
                window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                report(metrics, save=save)
            if step >= total_steps:
                break
        if batch_in_epoch >= len(sampler):  # a whole epoch: evaluate on the held-out split
            epoch, batch_in_epoch = epoch + 1, 0
            if step < total_steps:
                last_knn = knn(net.encoder)
                report({})

    # The end: the trained encoder against the same encoder untrained and against raw pixels.
    last_knn = knn(net.encoder)
    torch.manual_seed(train_cfg.seed)
    untrained = build_encoder(config.model).to(device)
    final = {
        "knn_top1_trained": last_knn,
        "knn_top1_untrained": knn(untrained),
        "knn_top1_raw_pixels": knn_top1(to_float(data.train_images[bank]).flatten(1), data.train_labels[bank],
                                        to_float(data.test_images[test]).flatten(1), data.test_labels[test],
                                        train_cfg.knn_k),
    }
    report(final, save=True, final=True)
