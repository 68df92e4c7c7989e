"""The per-worker training loop. Runs inside each Ray Train worker; knows nothing of the driver,
nor of any one dataset: the task (distributed_cl/tasks) turns decoded rows into the towers'
inputs, builds the towers and evaluates them, and the data arrives as `Splits` from the driver
(held in memory) or as this worker's shard of a Ray Data stream.

`train_loop_per_worker` reads top to bottom: set up the worker, its data and the model; restore
the latest checkpoint if there is one; train (`train_step`), with a progress line per metrics
window and periodic checkpoints; evaluate on the held-out split after each epoch; at the end
compare the trained towers with the same towers untrained and with the task's baselines, and
export them.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import queue
import random
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import prepare_model
from torch import nn

from distributed_cl import distributed as dist_utils
from distributed_cl.callbacks import DATA_ERROR
from distributed_cl.config import Config
from distributed_cl.data.formats import skipped_rows_error
from distributed_cl.data.sources import load_splits
from distributed_cl.data.stream import StreamBatches
from distributed_cl.grad_cache import grad_cache_backward
from distributed_cl.objectives import build_objective
from distributed_cl.optim import build_optimizer, param_groups, warmup_cosine
from distributed_cl.queue import NegativeQueue
from distributed_cl.samplers import DistributedMPerClassSampler, DistributedRandomBatchSampler
from distributed_cl.tasks import TASKS, ContrastiveModel, Task, to_device

STATE_FILE = "state.pt"
EXPORT_DIR = "export"
WORKERS_FILE = "workers.json"  # in every checkpoint: where each rank ran
TRAIN_DATASET = "train"  # the streamed training split's name in TorchTrainer(datasets=...)


# ----------------------------------------------------------------------------- the step


def train_step(model: nn.Module, net: ContrastiveModel, optimizer: torch.optim.Optimizer, batch: dict,
               autocast: Callable[[], AbstractContextManager], scheduler=None, grad_cache_chunk: int | None = None,
               grad_clip: float = 0.0, negatives: NegativeQueue | None = None) -> torch.Tensor:
    """One optimizer step on a batch already on the device; returns the loss (not synced to the host).
    `model` is `net` or its DDP wrapper; gradient caching gives the same step in chunks of activations;
    `negatives` adds the queue's past keys to the loss, and enqueues this step's after it.
    The loop and the benchmarks both step through here."""
    if negatives is not None:
        batch = {**batch, "memory": negatives.memory()}
    optimizer.zero_grad(set_to_none=True)
    if grad_cache_chunk:
        loss = grad_cache_backward(model, net, batch, grad_cache_chunk, autocast)
    else:
        with autocast():
            loss = model(batch)
        loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if negatives is not None:
        with autocast():
            negatives.after_step(net.towers, batch, net.step_keys, grad_cache_chunk)
    return loss.detach()


class MetricsWindow:
    """The loss summed on the device and read once per window (no host sync per step), samples/s."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.samples, self.start = torch.zeros(1, device=self.device), 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += loss
        self.steps += 1
        self.samples += samples

    def read(self, net: ContrastiveModel, scheduler, world: int) -> dict:
        mean_loss = dist_utils.all_reduce_sum(self.loss).item() / world  # the mean over ranks is the global loss
        stats = net.loss_fn.last_stats
        metrics = {
            "loss": mean_loss / self.steps,
            "lr": scheduler.get_last_lr()[0] / scheduler.optimizer.param_groups[0].get("lr_mult", 1.0),  # optim.lr's
            **net.loss_fn.logged(),  # the temperature in use (CLIP and SigLIP learn theirs)
            "samples_per_s": self.samples * world / (time.perf_counter() - self.start),
            "anchors_without_positive": stats.anchors_without_positive,
            "mean_positives": stats.mean_positives,
            "empty_batches": net.loss_fn.empty_batches,
        }
        self._reset()
        return metrics


# ----------------------------------------------------------------------------- state


def rng_state() -> dict:
    """Every RNG a step draws from: torch's CPU and every CUDA device's, numpy's, Python's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint with the weights and every rank's RNG."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    anchors_without_positive_total: int = 0  # over every step of the run
    # a stream's counts over all ranks for one pass over the data (the largest of the finished
    # epochs): rows read, rows that did not decode, rows no batch took (see data/stream.py)
    stream_rows: int = 0
    stream_skipped_rows: int = 0
    stream_dropped_rows: int = 0


def save_state(directory: str, net: ContrastiveModel, optimizer, scheduler, progress: Progress, rng_states: list,
               negatives: NegativeQueue | None = None) -> None:
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "progress": vars(progress), "rng": rng_states,
                "negatives": negatives.state_dict() if negatives else None}, os.path.join(directory, STATE_FILE))


def restore_state(checkpoint: ray.train.Checkpoint, net: ContrastiveModel, optimizer, scheduler, rank: int,
                  device: torch.device, negatives: NegativeQueue | None = None) -> Progress:
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=False)
    net.load_state_dict(state["model"])
    if negatives is not None:
        negatives.load_state_dict(state["negatives"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank])
    return Progress(**state["progress"])


def peak_memory_mib(device: torch.device) -> float:
    """This worker's peak memory so far: the CUDA allocator's peak, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


# ----------------------------------------------------------------------------- set-up


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report (the whole metrics dict, from every worker), every checkpoint
    and its model wrapping at INFO: that would bury the trainer's progress lines. Warnings still show."""
    from ray.train.v2._internal.execution import context, storage
    from ray.train.v2.torch import train_loop_utils

    # context.py names its logger by file, the others by module
    for name in (context.__file__, storage.__name__, train_loop_utils.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_worker(config: Config) -> tuple[int, int, torch.device, list[dict]]:
    """Threads, logs, rank, world and device; rank 0 prints where every rank runs."""
    torch.set_num_threads(config.train.threads_per_worker)
    if not config.train.verbose:
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
    return rank, world, device, workers


class EpochBatches:
    """The training batches of an epoch, on the device: a batch sampler over the rows in memory
    (M-per-class for labelled losses, else a seeded permutation), or this worker's shard of the
    stream, which ends the epoch for every rank when one runs out."""

    def __init__(self, task: Task, config: Config, rank: int, world: int) -> None:
        self.task, self.world, self.rank, t = task, world, rank, config.train
        self.batch_log = t.batch_log
        if self.batch_log:
            os.makedirs(self.batch_log, exist_ok=True)
        self.stream: StreamBatches | None = None
        if task.data.streamed:
            x = config.dataset
            self.stream = StreamBatches(ray.train.get_dataset_shard(TRAIN_DATASET), t.global_batch_size // world,
                                        t.seed, rank, labelled=task.labelled(config), shuffle_buffer=x.shuffle_buffer,
                                        m=config.loss.m if config.labelled_loss else None)
            rows = task.data.train_rows
            self.batches_per_epoch = None if rows is None else max(1, rows // t.global_batch_size)
            return
        labels = task.data.train.labels
        if config.labelled_loss:
            self.sampler = DistributedMPerClassSampler(labels, config.loss.m, t.global_batch_size, world, rank,
                                                       seed=t.seed)
        else:
            self.sampler = DistributedRandomBatchSampler(len(labels), t.global_batch_size, world, rank, seed=t.seed)
        self.batches = task.train_batches(self.sampler)
        self.batches_per_epoch = len(self.sampler)

    def epoch(self, epoch: int, start_batch: int) -> Iterator[dict]:
        if self.stream is None:
            self.sampler.set_epoch(epoch, start_batch=start_batch)
            for batch in self.batches:
                yield to_device(batch, self.task.device)
            return
        rows = self.stream.epoch(epoch, start_batch)
        for batch_index in itertools.count(start_batch):
            local = next(rows, None)
            if not dist_utils.all_ranks(local is not None, self.task.device):
                rows.close()
                return
            if self.batch_log:
                with open(os.path.join(self.batch_log, f"rank{self.rank}.jsonl"), "a") as f:
                    f.write(json.dumps({"epoch": epoch, "batch": batch_index, "rows": local.digests()}) + "\n")
            yield self.task.augment(to_device(self.task.collate(local), self.task.device))


def evaluate_towers(task: Task, towers: nn.Module) -> dict[str, float]:
    """The task's held-out metrics of rank 0's model, the one exported: BatchNorm's running
    statistics differ between ranks after a step (DDP broadcasts rank 0's before each forward,
    then every rank updates them from its own batch)."""
    dist_utils.broadcast_buffers(towers)
    was_training = towers.training
    towers.eval()
    with torch.no_grad():
        metrics = task.evaluate(towers)
    towers.train(was_training)
    return metrics


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(loop_config: dict) -> None:
    """`loop_config`: {"config": Config.to_dict(), "data": a Ray object ref of the Splits, or None
    to load the config's data here}."""
    config = Config.from_dict(loop_config["config"])
    t = config.train
    rank, world, device, workers = setup_worker(config)
    data = ray.get(loop_config["data"]) if loop_config.get("data") is not None else load_splits(config, TASKS[config.task])
    task = TASKS[config.task](config, rank, world, device, data)
    batches = EpochBatches(task, config, rank, world)

    # Towers, loss and optimizer. Same seed on every rank: identical initial weights.
    torch.manual_seed(t.seed)
    loss_fn, objective = build_objective(config.loss)
    model = prepare_model(ContrastiveModel(task.build_towers(config), loss_fn, objective))
    net: ContrastiveModel = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(config.optim, param_groups(net, config.optim, net.towers.lr_mults()))
    negatives = NegativeQueue(config.loss.queue_size, t.momentum, net.towers) if config.loss.queue_size else None
    total_steps = t.max_steps or t.epochs * batches.batches_per_epoch
    scheduler = warmup_cosine(optimizer, config.optim.warmup_steps, total_steps)
    torch.manual_seed(t.seed * 10_000 + rank)  # augmentations differ per rank

    checkpoint = ray.train.get_checkpoint()
    progress = restore_state(checkpoint, net, optimizer, scheduler, rank, device, negatives) if checkpoint else Progress()
    start_step = progress.step
    last_eval = dict.fromkeys(task.metric_names(config), float("nan"))
    send = Reporter()

    def stream_counts() -> tuple[int, int, int]:
        """The stream's (rows, skipped, dropped) of the epoch in progress, over all ranks."""
        s = batches.stream
        return tuple(dist_utils.all_reduce_sum(torch.tensor([s.rows_seen, s.skipped_rows, s.dropped_rows])).tolist())

    def data_counts() -> dict:
        """Rows lost to decoding and batching in one pass over the data (a stream meets its bad
        rows every epoch: the epoch with the most counts), and anchors without a positive."""
        rows, skipped, dropped = stream_counts() if batches.stream else (0, 0, 0)
        return {"skipped_rows": data.skipped_rows + max(progress.stream_skipped_rows, skipped),
                "stream_rows": max(progress.stream_rows, rows),
                "dropped_rows": max(progress.stream_dropped_rows, dropped),
                "anchors_without_positive_total": progress.anchors_without_positive_total}

    def stream_error(whole_epoch: bool) -> str | None:
        """Why the stream has more undecodable rows than dataset.max_skipped_fraction allows, or
        None; judged once the epoch is whole or a thousand of its rows are in. The same answer on
        every rank: the counts are summed over all of them."""
        if batches.stream is None:
            return None
        rows, skipped, _ = stream_counts()
        if not whole_epoch and rows < 1000:
            return None
        examples = [e for ex in _all_ranks(batches.stream.skipped_examples, world) for e in ex]
        return skipped_rows_error(skipped, rows, config.dataset.max_skipped_fraction, examples)

    def report(metrics: dict, save: bool = False, final: bool = False) -> None:
        """Every rank reports; with `save`, rank 0 attaches a checkpoint (every rank's RNG inside)."""
        metrics = {"step": progress.step, "epoch": progress.epoch, "start_step": start_step, **last_eval,
                   **data_counts(), **metrics}
        if not save:
            send(metrics)
            return
        rng_states = _all_ranks(rng_state(), world)
        if rank != 0:
            send(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(d, net, optimizer, scheduler, progress, rng_states, negatives)
            with open(os.path.join(d, WORKERS_FILE), "w") as f:
                json.dump(workers, f, indent=1)
            if final:
                os.makedirs(os.path.join(d, EXPORT_DIR))
                task.export(net.towers, os.path.join(d, EXPORT_DIR))
            send(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def stop_on_data_error(error: str) -> None:
        """End the run with the reason in its last report (callbacks.StopOnDataError raises it in
        the controller). Raised here, Ray Train would restart the workers on the same rows."""
        send({"step": progress.step, "epoch": progress.epoch, DATA_ERROR: error, **data_counts()})
        send.flush()

    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    window = MetricsWindow(device)
    while progress.step < total_steps:
        ran_out, epoch_start = True, progress.step  # ran_out: the epoch's batches did (not stopped at total_steps)
        for batch in batches.epoch(progress.epoch, progress.batch_in_epoch):
            loss = train_step(model, net, optimizer, batch, autocast, scheduler, t.grad_cache_chunk,
                              config.optim.grad_clip, negatives)
            progress.step, progress.batch_in_epoch = progress.step + 1, progress.batch_in_epoch + 1
            progress.anchors_without_positive_total += net.loss_fn.last_stats.anchors_without_positive
            window.add(loss, len(batch["labels"]))
            save = progress.step % t.checkpoint_every == 0 and progress.step < total_steps
            if save or progress.step % t.log_every == 0 or progress.step == total_steps:
                if error := stream_error(whole_epoch=False):
                    return stop_on_data_error(error)
                report(window.read(net, scheduler, world), save=save)
            if progress.step >= total_steps:
                ran_out = progress.batch_in_epoch == batches.batches_per_epoch and batches.stream is None
                break
        if not ran_out:
            break
        if progress.step == epoch_start and progress.batch_in_epoch == 0:
            raise RuntimeError(f"epoch {progress.epoch} had no full batch of train.global_batch_size="
                               f"{t.global_batch_size}: {data_counts()}")
        if batches.stream:  # the epoch's counts are whole now: kept in the checkpoint
            if error := stream_error(whole_epoch=True):
                return stop_on_data_error(error)
            rows, skipped, dropped = stream_counts()
            progress.stream_rows = max(progress.stream_rows, rows)
            progress.stream_skipped_rows = max(progress.stream_skipped_rows, skipped)
            progress.stream_dropped_rows = max(progress.stream_dropped_rows, dropped)
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        if progress.step < total_steps:  # a whole epoch: evaluate on the held-out split
            last_eval = evaluate_towers(task, net.towers)
            report({})

    # The end: the trained towers against the same towers untrained and the task's baselines.
    last_eval = evaluate_towers(task, net.towers)
    torch.manual_seed(t.seed)
    untrained = evaluate_towers(task, task.build_towers(config).to(device))
    final = {f"{name}_trained": value for name, value in last_eval.items()}
    final |= {f"{name}_untrained": value for name, value in untrained.items()}
    final["peak_memory_mib"] = max(_all_ranks(peak_memory_mib(device), world))  # the largest worker's
    report(final | task.baselines(), save=True, final=True)
    send.flush()  # every rank's last report is in before the worker returns
