"""The per-worker training loop. Runs inside each Ray Train worker; knows nothing of the driver,
nor of any one dataset: the task (distributed_cl/tasks) supplies data, towers and evaluation.

Read top to bottom: build the task's data and towers, the loss, optimizer and schedule; restore
the latest checkpoint if there is one; train with periodic metrics and checkpoints; evaluate on
the held-out split each epoch; at the end compare the trained towers with the same towers
untrained and with the task's baselines, and export them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import random
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import prepare_model
from torch import nn

from distributed_cl import distributed as dist_utils
from distributed_cl.config import LABELLED_LOSSES, Config, OptimConfig
from distributed_cl.grad_cache import grad_cache_backward
from distributed_cl.losses import ClipLoss
from distributed_cl.samplers import DistributedMPerClassSampler, DistributedRandomBatchSampler
from distributed_cl.tasks import TASKS, ContrastiveModel, build_objective, to_device

STATE_FILE = "state.pt"
EXPORT_DIR = "export"
WORKERS_FILE = "workers.json"  # in every checkpoint: where each rank ran


# ----------------------------------------------------------------------------- components


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


class Reporter:
    """`ray.train.report` off the training thread. Ray Train keeps one report in flight per worker:
    the next blocks until the controller polls (every 0.25 s here), a stall a fast GPU step would
    pay at every progress line. Metrics-only reports go to a background thread, in order;
    a report with a checkpoint (whose directory is deleted after) waits for them, then blocks."""

    def __init__(self) -> None:
        self._pending: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="distributed_cl-report", daemon=True).start()

    def _run(self) -> None:
        while True:
            metrics = self._pending.get()
            try:
                if self._error is None:
                    ray.train.report(metrics)
            except BaseException as e:  # raised on the training thread at its next report
                self._error = e
            finally:
                self._pending.task_done()

    def __call__(self, metrics: dict, checkpoint: ray.train.Checkpoint | None = None) -> None:
        if checkpoint is None:
            self._pending.put(metrics)
        else:
            self.flush()
            ray.train.report(metrics, checkpoint=checkpoint)
        self._raise()

    def flush(self) -> None:
        self._pending.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


# ----------------------------------------------------------------------------- the loop


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report (the whole metrics dict, from every worker), every checkpoint
    and its model wrapping at INFO: that would bury the trainer's progress lines. Warnings still show."""
    from ray.train.v2._internal.execution import context, storage
    from ray.train.v2.torch import train_loop_utils

    # context.py names its logger by file, the others by module
    for name in (context.__file__, storage.__name__, train_loop_utils.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(raw_config: dict) -> None:
    config = Config.from_dict(raw_config)
    train_cfg = config.train
    torch.set_num_threads(train_cfg.threads_per_worker)
    if not train_cfg.verbose:
        _quiet_ray_train_logs()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    workers = _all_ranks({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                          "host": socket.gethostname(), "device": str(device)}, world)
    if rank == 0:  # on a cluster, the first thing to check; not print(), which Ray Train's patch writes twice
        sys.stdout.write("[distributed_cl] workers: " + ", ".join(
            f"rank {w['rank']} on {w['host']} (node {w['node_id'][:8]}, {w['device']})" for w in workers) + "\n")
        sys.stdout.flush()

    # Data: the task's batches for a batch sampler that yields this rank's slice of every global
    # batch (moved to the device here: Ray's prepare_data_loader would replace the sampler).
    task = TASKS[config.task](config, rank, world, device)
    if config.loss.name in LABELLED_LOSSES:
        sampler = DistributedMPerClassSampler(task.train_labels, config.loss.m, train_cfg.global_batch_size,
                                              world, rank, seed=train_cfg.seed)
    else:
        sampler = DistributedRandomBatchSampler(len(task.train_labels), train_cfg.global_batch_size, world, rank,
                                                seed=train_cfg.seed)
    batches = task.train_batches(sampler)

    def evaluate(towers: nn.Module) -> dict[str, float]:
        # Every rank evaluates rank 0's model, the one exported: BatchNorm's running statistics
        # differ between ranks after a step (DDP broadcasts rank 0's before each forward, then
        # every rank updates them from its own batch).
        dist_utils.broadcast_buffers(towers)
        was_training = towers.training
        towers.eval()
        with torch.no_grad():
            metrics = task.evaluate(towers)
        towers.train(was_training)
        return metrics

    # Towers, loss and optimizer. Same seed on every rank: identical initial weights.
    torch.manual_seed(train_cfg.seed)
    loss_fn, objective = build_objective(config.loss)
    model = prepare_model(ContrastiveModel(task.build_towers(config), loss_fn, objective))
    net: ContrastiveModel = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(config.optim, [p for p in model.parameters() if p.requires_grad])
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
    last_eval = dict.fromkeys(task.metric_names, float("nan"))
    send = Reporter()

    def report(metrics: dict, save: bool = False, final: bool = False) -> None:
        """Every rank reports; with `save`, rank 0 attaches a checkpoint (every rank's RNG inside)."""
        metrics = {"step": step, "epoch": epoch, "start_step": start_step, **last_eval, **metrics}
        if not save:
            send(metrics)
            return
        rng_states = _all_ranks(_rng_state(), world)
        if rank != 0:
            send(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                        "batch_in_epoch": batch_in_epoch, "rng": rng_states}, os.path.join(d, STATE_FILE))
            with open(os.path.join(d, WORKERS_FILE), "w") as f:
                json.dump(workers, f, indent=1)
            if final:
                os.makedirs(os.path.join(d, EXPORT_DIR))
                task.export(net.towers, os.path.join(d, EXPORT_DIR))
            send(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # the loss is summed on the device and read once per log window: no host sync per step
    window_loss, window_steps, window_samples, window_start = torch.zeros(1, device=device), 0, 0, time.perf_counter()
    while step < total_steps:
        sampler.set_epoch(epoch, start_batch=batch_in_epoch)
        for batch in batches:
            batch = to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            if train_cfg.grad_cache_chunk:  # the same gradient, one chunk of activations at a time
                loss = grad_cache_backward(model, net, batch, train_cfg.grad_cache_chunk, autocast)
            else:
                with autocast():
                    loss = model(batch)
                loss.backward()
            if config.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            window_loss += loss.detach()
            window_steps += 1
            window_samples += len(batch["labels"])

            save = step % train_cfg.checkpoint_every == 0 and step < total_steps
            if save or step % train_cfg.log_every == 0 or step == total_steps:
                # the mean over ranks of the returned losses is the global loss
                mean_loss = dist_utils.all_reduce_sum(window_loss).item() / world
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
                window_loss, window_steps, window_samples = torch.zeros(1, device=device), 0, 0
                window_start = time.perf_counter()
                report(metrics, save=save)
            if step >= total_steps:
                break
        if batch_in_epoch >= len(sampler):  # a whole epoch: evaluate on the held-out split
            epoch, batch_in_epoch = epoch + 1, 0
            if step < total_steps:
                last_eval = evaluate(net.towers)
                report({})

    # The end: the trained towers against the same towers untrained and the task's baselines.
    last_eval = evaluate(net.towers)
    torch.manual_seed(train_cfg.seed)
    untrained = evaluate(task.build_towers(config).to(device))
    final = {f"{name}_trained": value for name, value in last_eval.items()}
    final |= {f"{name}_untrained": value for name, value in untrained.items()}
    report(final | task.baselines(), save=True, final=True)
    send.flush()  # every rank's last report is in before the worker returns
