"""The per-worker training loop. Runs inside each Ray Train worker; knows nothing of the driver,
nor of any one dataset: the task (distributed_cl/tasks) turns decoded rows into the towers'
inputs, builds the towers and evaluates them, and the data arrives as `Splits` from the driver
(held in memory) or as this worker's shard of a Ray Data stream.

`ContrastiveRecipe` is the loop, a method a stage (as torchtune's recipes), and reads top to
bottom: `setup` the worker, its data and the model, and `restore` the latest checkpoint if there
is one; `train` epochs of `train_epoch`, each batch a `step` (`train_step`), with a progress line
per metrics window and periodic checkpoints (`report`, `save`); `evaluate` on the held-out split
after each whole epoch; `finish`: the trained towers against the same towers untrained and the
task's baselines, exported. `train_loop_per_worker`, what Ray Train calls, builds it and runs it.
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
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import prepare_model
from torch import nn

from distributed_cl import distributed as dist_utils
from distributed_cl.config import Config, TrainOptions
from distributed_cl.data.formats import DATA_ERROR, TooManySkippedRows, check_skipped
from distributed_cl.data.sources import SourcesOptions, source_of_step
from distributed_cl.data.stream import PartRun, StreamBatches, part_runs
from distributed_cl.data.table import Splits
from distributed_cl.grad_cache import grad_cache_backward
from distributed_cl.losses import LossStats
from distributed_cl.model_card import Training, write_cards
from distributed_cl.models.lora import merged, save_adapters
from distributed_cl.optim import param_groups, warmup_cosine
from distributed_cl.options import join_path
from distributed_cl.queue import NegativeQueue
from distributed_cl.samplers import DistributedMPerClassSampler, DistributedRandomBatchSampler
from distributed_cl.sharding import (
    activation_checkpointing,
    average_replicated_grads,
    clip_grad_norm_,
    compile_blocks,
    full_state_dict,
    fully_shard_model,
    load_shards,
    save_shards,
)
from distributed_cl.tasks import TASKS, ContrastiveModel, Task, to_device

STATE_FILE = "state.pt"
EXPORT_DIR = "export"
REPORT_VIEW = "report_view"  # a report's key for the run report's view of the held-out split (not a metric)
WORKERS_FILE = "workers.json"  # in every checkpoint: where each rank ran
TRAIN_DATASET = "train"  # the streamed training split's name in TorchTrainer(datasets=...)


def stream_name(source: Config, config: Config) -> str:
    """A streamed training split's name in TorchTrainer(datasets=...): `source` is one of
    `config.source_configs()`."""
    return TRAIN_DATASET if source is config or not isinstance(config.dataset, SourcesOptions) \
        else f"{TRAIN_DATASET}_{source.dataset.name}"


# ----------------------------------------------------------------------------- the step


def train_step(model: nn.Module, net: ContrastiveModel, optimizer: torch.optim.Optimizer, batch: dict,
               autocast: Callable[[], AbstractContextManager],
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, grad_cache_chunk: int | None = None,
               grad_clip: float = 0.0, negatives: NegativeQueue | None = None,
               grad_cache_tokens: int | None = None) -> tuple[torch.Tensor, LossStats]:
    """One optimizer step on a batch already on the device; returns the loss (not synced to the
    host) and the loss's statistics of the global batch. `model` is `net`, its DDP wrapper, or
    `net` sharded by FSDP; gradient caching gives the same step in chunks of activations;
    `negatives` adds the queue's past keys to the loss, and enqueues this step's after it. The
    loop and the benchmarks both step through here."""
    if negatives is not None:
        batch = {**batch, "memory": negatives.memory()}
    optimizer.zero_grad(set_to_none=True)
    if grad_cache_chunk or grad_cache_tokens:
        loss, stats = grad_cache_backward(model, net, batch, grad_cache_chunk, autocast, grad_cache_tokens)
    else:
        with autocast():
            loss, stats = model(batch)
        loss.backward()
    average_replicated_grads(net)  # FSDP leaves the loss's own parameters whole: DDP's mean for them
    if grad_clip:
        clip_grad_norm_(list(model.parameters()), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if negatives is not None:
        with autocast():
            negatives.after_step(net.towers, batch, net.step_keys, grad_cache_chunk)
    return loss.detach(), stats


class MetricsWindow:
    """The loss summed on the device and read once per window (no host sync per step), samples/s,
    and the window's last loss statistics."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.samples, self.start = torch.zeros(1, device=self.device), 0, 0, time.perf_counter()
        self.stats: LossStats | None = None

    def add(self, loss: torch.Tensor, stats: LossStats, samples: int) -> None:
        """A step's loss and statistics, and `samples`: the global batch's rows (the workers' shares
        may differ: a stream's parts split unevenly over an elastic run's workers)."""
        self.loss += loss
        self.steps += 1
        self.samples += samples
        self.stats = stats

    def read(self, loss_fn: nn.Module, scheduler: torch.optim.lr_scheduler.LRScheduler, world: int) -> dict:
        """The window's metrics (a collective: the loss is summed over ranks); starts the next window."""
        mean_loss = dist_utils.all_reduce_sum(self.loss).item() / world  # the mean over ranks is the global loss
        metrics = {
            "loss": mean_loss / self.steps,
            "lr": scheduler.get_last_lr()[0] / scheduler.optimizer.param_groups[0].get("lr_mult", 1.0),  # optim.lr's
            **loss_fn.logged(),  # the temperature in use (CLIP and SigLIP learn theirs): the loss's log_keys
            "samples_per_s": self.samples / (time.perf_counter() - self.start),
            **self.stats.logged(),  # LossStats.log_keys
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
class SourceState:
    """Where one of several sources (dataset.sources) stands: its own epoch and batch within it,
    the batches it gave the run, and its stream's counts (as Progress's, for one pass over it)."""

    epoch: int = 0
    batch_in_epoch: int = 0
    batches: int = 0
    stream_rows: int = 0
    stream_skipped_rows: int = 0
    stream_dropped_rows: int = 0


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint with the weights and every rank's RNG."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    anchors_without_positive_total: int = 0  # over every step of the run
    empty_batches: int = 0  # steps whose global batch had no positive pair at all (a zero loss)
    # a stream's counts over all ranks for one pass over the data (the largest of the finished
    # epochs): rows read, rows that did not decode, rows no batch took (see data/stream.py)
    stream_rows: int = 0
    stream_skipped_rows: int = 0
    stream_dropped_rows: int = 0
    sources: list[SourceState] = field(default_factory=list)  # with several sources: each one's

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        return cls(**{**state, "sources": [SourceState(**x) for x in state.get("sources", [])]})


def save_state(directory: str, net: ContrastiveModel, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress, rng_states: list,
               negatives: NegativeQueue | None = None, sharded: bool = False) -> None:
    """The checkpoint's state file; `sharded`: the weights and optimizer state are in each
    worker's shards beside it (sharding.save_shards), not in it."""
    whole = not sharded
    torch.save({"model": trainable_state(net) if whole else None, "optimizer": optimizer.state_dict() if whole else None,
                "scheduler": scheduler.state_dict(),
                "progress": progress.state_dict(), "rng": rng_states,
                "negatives": negatives.state_dict() if negatives else None}, os.path.join(directory, STATE_FILE))


def _frozen(net: nn.Module) -> set[str]:
    return {name for name, p in net.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trainable_state(net: nn.Module) -> dict:
    """`net`'s state dict without its frozen parameters (LoRA's base model, a frozen tower): the
    config rebuilds them as they were, so a checkpoint holds what training changes."""
    frozen = _frozen(net)
    return {k: v for k, v in net.state_dict().items() if k not in frozen}


def load_trainable_state(net: nn.Module, state: dict) -> None:
    """What `trainable_state` saved, into `net` as the config built it; nothing else missing."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or set(missing) - _frozen(net):
        raise RuntimeError(f"the checkpoint does not match the model: missing {sorted(set(missing) - _frozen(net))[:5]}, "
                           f"unexpected {unexpected[:5]}")


def restore_state(checkpoint: ray.train.Checkpoint, net: ContrastiveModel, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, device: torch.device,
                  negatives: NegativeQueue | None = None, world: int = 1, seed: int = 0) -> Progress:
    """The checkpoint's state into the model, optimizer, schedule and queue, and this rank's RNG
    states; on another number of workers than saved it (an elastic run), the RNGs seeded afresh."""
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=False)
        if state["model"] is None:  # sharded: every worker reads its part of the shards
            load_shards(d, net, optimizer)
    if state["model"] is not None:
        load_trainable_state(net, state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if negatives is not None:
        negatives.load_state_dict(state["negatives"])
    scheduler.load_state_dict(state["scheduler"])
    progress = Progress.from_state(state["progress"])
    if len(state["rng"]) == world:
        set_rng_state(state["rng"][rank])
    else:  # another worker count (an elastic range): each rank's draws start afresh, seeded
        seed_rngs(seed, progress.step, rank)
    return progress


def seed_rngs(seed: int, step: int, rank: int) -> None:
    """Every RNG a step draws from, seeded by the run's seed, the step and the rank."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


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


def _ray_train_loggers() -> tuple[str, ...]:
    """The names of Ray Train's loggers that log at INFO every report (the whole metrics dict,
    from every worker), every checkpoint and the model's wrapping. Names, not imports: their
    modules are Ray's private ones. context.py names its logger by its file, the others by module."""
    ray_dir = os.path.dirname(ray.__file__)
    return (os.path.join(ray_dir, "train", "v2", "_internal", "execution", "context.py"),
            "ray.train.v2._internal.execution.storage",
            "ray.train.v2.torch.train_loop_utils")


def _quiet_ray_train_logs() -> None:
    """Ray Train's INFO lines would bury the trainer's progress lines. Warnings still show."""
    for name in _ray_train_loggers():
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


def worker_shares(t: TrainOptions, world: int, streamed: bool) -> list[int]:
    """The rows of a global batch each of `world` workers takes: equal shares, or of a stream, its
    parts' rows (a run of parts a worker, some one part more where they do not divide evenly)."""
    if not streamed:
        return [t.global_batch_size // world] * world
    return [len(run) * (t.global_batch_size // t.stream_parts) for run in part_runs(t.stream_parts, world)]


class EpochBatches:
    """The training batches of an epoch, on the device: a batch sampler over the rows in memory
    (M-per-class for labelled losses, else a seeded permutation), or this worker's shard of the
    stream, which ends the epoch for every rank when one runs out."""

    def __init__(self, task: Task, config: Config, rank: int, world: int, stream: str = TRAIN_DATASET) -> None:
        """`stream`: the streamed split's name in TorchTrainer(datasets=...) (stream_name)."""
        self.task, self.world, self.rank, t = task, world, rank, config.train
        self.batch_log = t.batch_log
        if self.batch_log:
            os.makedirs(self.batch_log, exist_ok=True)
        self.source = config.dataset.name if config.dataset is not None else None
        self.stream: StreamBatches | None = None
        if task.data.streamed:
            x = config.dataset
            shard = ray.train.get_dataset_shard(stream)  # one part of the stream, or a run of them (StreamParts)
            run = shard if isinstance(shard, PartRun) else PartRun(rank, [shard])
            self.stream = StreamBatches(run, t.global_batch_size // t.stream_parts, t.seed,
                                        labelled=task.labelled(config), shuffle_buffer=x.shuffle_buffer,
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
                    f.write(json.dumps({"source": self.source, "epoch": epoch, "batch": batch_index,
                                        "rows": local.digests()}) + "\n")
            yield self.task.augment(to_device(self.task.collate(local), self.task.device))


class SourceMix:
    """The training batches of several sources (dataset.sources), with EpochBatches' interface:
    step s's global batch comes from the source `source_of_step` draws for s (every rank draws the
    same), and each source walks its own epochs (Progress.sources), restarting where it runs out.
    The run's epoch is as many steps as the sources' epochs have batches together (unknown where a
    stream's size is: then only the steps end the run). The sources' iterators stay open across
    the run's epochs; a resume reopens each at its own position."""

    stream = None  # the run's epoch is known whole by its count of batches, as cached data's

    def __init__(self, sources: list[EpochBatches], accounts: list[DataAccounts], weights: np.ndarray,
                 seed: int) -> None:
        self.sources, self.accounts, self.weights, self.seed = sources, accounts, weights, seed
        known = [b.batches_per_epoch for b in sources]
        self.batches_per_epoch = None if None in known else sum(known)
        self.progress: Progress | None = None  # the recipe's, set once restored
        self.open: dict[int, Iterator[dict]] = {}

    def epoch(self, epoch: int, start_batch: int) -> Iterator[dict]:
        p = self.progress
        if not p.sources:
            p.sources = [SourceState() for _ in self.sources]
        batch_in_epoch = start_batch
        while self.batches_per_epoch is None or batch_in_epoch < self.batches_per_epoch:
            i = source_of_step(self.weights, self.seed, p.step)
            yield self._next(i)
            batch_in_epoch += 1

    def _next(self, i: int) -> dict:
        """Source i's next batch; where its epoch has run out, the first of its next epoch."""
        state = self.progress.sources[i]
        for _ in range(2):
            if i not in self.open:
                self.open[i] = self.sources[i].epoch(state.epoch, state.batch_in_epoch)
            batch = next(self.open[i], None)
            if batch is not None:
                state.batch_in_epoch, state.batches = state.batch_in_epoch + 1, state.batches + 1
                return batch
            del self.open[i]
            if state.batch_in_epoch == 0:
                raise RuntimeError(f"dataset.sources[{self.sources[i].source}]: epoch {state.epoch} had no full "
                                   "batch of train.global_batch_size")
            self.accounts[i].close_epoch(state)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        raise AssertionError("unreachable: a fresh epoch either gives a batch or raises")


class DataAccounts:
    """What the data lost, summed over ranks: the rows that did not decode when the splits were
    loaded, and a stream's rows that did not decode or that no batch took (StreamBatches counts
    them per rank, afresh every epoch). A stream meets its bad rows again every epoch, so one pass
    over the data counts as its largest epoch: the finished epochs' maxima are kept in Progress
    (checkpointed), the epoch in progress is read off the stream. With a stream every method is a
    collective: every rank calls it at the same point."""

    CHECK_AFTER_ROWS = 1000  # mid-epoch, the skipped fraction is judged once this many rows are in

    def __init__(self, stream: StreamBatches | None, loaded_skipped_rows: int, max_skipped_fraction: float,
                 world: int, device: torch.device) -> None:
        self.stream, self.loaded_skipped_rows = stream, loaded_skipped_rows
        self.max_skipped_fraction, self.world, self.device = max_skipped_fraction, world, device

    def epoch_counts(self) -> tuple[int, int, int]:
        """The epoch in progress: (rows read, rows that did not decode, rows no batch took)."""
        if self.stream is None:
            return 0, 0, 0
        s = self.stream
        counts = torch.tensor([s.rows_seen, s.skipped_rows, s.dropped_rows], device=self.device)
        rows, skipped, dropped = dist_utils.all_reduce_sum(counts).tolist()
        return rows, skipped, dropped

    def metrics(self, progress: Progress | SourceState) -> dict[str, int]:
        """Rows lost to decoding and batching in one pass over the data (`progress`: where the
        finished epochs' maxima are kept)."""
        rows, skipped, dropped = self.epoch_counts()
        return {"skipped_rows": self.loaded_skipped_rows + max(progress.stream_skipped_rows, skipped),
                "stream_rows": max(progress.stream_rows, rows),
                "dropped_rows": max(progress.stream_dropped_rows, dropped)}

    def check(self, whole_epoch: bool) -> None:
        """Raise TooManySkippedRows if the stream has more undecodable rows than
        dataset.max_skipped_fraction allows; judged once the epoch is whole or enough of its rows
        are in. Every rank reaches the same verdict: the counts are summed over all of them."""
        if self.stream is None:
            return
        rows, skipped, _ = self.epoch_counts()
        if not whole_epoch and rows < self.CHECK_AFTER_ROWS:
            return
        examples = [e for ex in _all_ranks(self.stream.skipped_examples, self.world) for e in ex]
        check_skipped(skipped, rows, self.max_skipped_fraction, examples)

    def close_epoch(self, progress: Progress | SourceState) -> None:
        """The epoch's counts are whole: check them, and keep their maxima in the progress."""
        if self.stream is None:
            return
        self.check(whole_epoch=True)
        rows, skipped, dropped = self.epoch_counts()
        progress.stream_rows = max(progress.stream_rows, rows)
        progress.stream_skipped_rows = max(progress.stream_skipped_rows, skipped)
        progress.stream_dropped_rows = max(progress.stream_dropped_rows, dropped)


class SourceAccounts:
    """Several sources' DataAccounts as one: their rows summed (each source's one pass), and the
    batches each source gave the run (`batches_<name>`). Each source closes its own epochs (SourceMix)."""

    def __init__(self, accounts: list[DataAccounts], names: list[str]) -> None:
        self.accounts, self.names = accounts, names

    def check(self, whole_epoch: bool) -> None:
        for accounts in self.accounts:
            accounts.check(whole_epoch)

    def close_epoch(self, progress: Progress) -> None:
        pass

    def metrics(self, progress: Progress) -> dict[str, int]:
        states = progress.sources or [SourceState() for _ in self.accounts]
        parts = [accounts.metrics(state) for accounts, state in zip(self.accounts, states)]
        return {key: sum(part[key] for part in parts) for key in parts[0]} | \
            {f"batches_{name}": state.batches for name, state in zip(self.names, states)}


def evaluate_towers(task: Task, towers: nn.Module) -> dict[str, float]:
    """The task's held-out metrics of rank 0's model, the one exported: BatchNorm's running
    statistics differ between ranks after a step (DDP broadcasts rank 0's before each forward,
    then every rank updates them from its own batch)."""
    dist_utils.broadcast_buffers(towers)
    with evaluating(towers):
        return task.evaluate_all(towers)


@contextmanager
def evaluating(towers: nn.Module) -> Iterator[nn.Module]:
    """`towers` in eval mode without autograd, back in their mode after."""
    was_training = towers.training
    towers.eval()
    try:
        with torch.no_grad():
            yield towers
    finally:
        towers.train(was_training)


# ----------------------------------------------------------------------------- the recipe


class ContrastiveRecipe:
    """One worker's run. Every rank calls the same methods in the same order: most hold
    collectives (DDP's, the metrics window's sum, every rank's RNG in a checkpoint, a stream's
    counts). Resuming is exact: the RNGs are drawn in the same order as in an uninterrupted run."""

    def __init__(self, config: Config) -> None:
        self.config = config

    # ------------------------------------------------------------------------- set-up

    def setup(self, data: ray.ObjectRef | None = None) -> None:
        """The worker, its data (`data`: the driver's Splits, or None to load them here), the
        model, optimizer and schedule, then the latest checkpoint if there is one."""
        config, t = self.config, self.config.train
        self.rank, self.world, self.device, self.workers = setup_worker(config)
        sources = config.source_configs()  # one, or each of dataset.sources
        every: list[Splits] = ray.get(data) if data is not None else [TASKS[config.task].load_data(c) for c in sources]
        self.tasks = [TASKS[config.task](c, self.rank, self.world, self.device, s) for c, s in zip(sources, every)]
        self.task = self.tasks[0]  # builds and exports the towers
        batches = [EpochBatches(task, c, self.rank, self.world, stream_name(c, config)) for task, c in zip(self.tasks, sources)]
        accounts = [DataAccounts(b.stream, s.skipped_rows, c.dataset.max_skipped_fraction if c.dataset else 0.0,  # (only a
                                 self.world, self.device) for b, s, c in zip(batches, every, sources)]  # stream is judged)
        self.names = [c.dataset.name for c in sources] if isinstance(config.dataset, SourcesOptions) else None
        if self.names is None:
            self.batches, self.accounts = batches[0], accounts[0]
        else:
            self.batches = SourceMix(batches, accounts, config.dataset.weights, t.seed)
            self.accounts = SourceAccounts(accounts, self.names)

        # Towers, loss and optimizer. Same seed on every rank: identical initial weights.
        torch.manual_seed(t.seed)
        net = ContrastiveModel(self.task.build_towers(config), config.loss.build(), config.loss)
        net.train()  # (transformers' from_pretrained returns its model in eval mode: no dropout)
        self.architecture = net.towers.architecture()  # what a whole copy is built from (evaluation, exports)
        if t.activation_checkpointing:
            activation_checkpointing(net.towers)
        if t.compile:
            compile_blocks(net.towers)
        if t.strategy == "fsdp":
            # FSDP moves each block to the device as it shards it: the whole model is never there
            self.model = fully_shard_model(net, list(net.loss_fn.to(self.device).parameters()), self.device)
        else:
            self.model = prepare_model(net)
        self.net: ContrastiveModel = net
        self.optimizer = config.optim.build(param_groups(self.net, config.optim, self.net.towers.lr_mults()))
        queue_size = getattr(config.loss, "queue_size", 0)  # only the losses that take past keys have one
        self.negatives = NegativeQueue(queue_size, t.momentum, self.net.towers) if queue_size else None
        self.total_steps = t.max_steps or t.epochs * self.batches.batches_per_epoch
        self.scheduler = warmup_cosine(self.optimizer, config.optim.warmup_steps, self.total_steps)
        torch.manual_seed(t.seed * 10_000 + self.rank)  # augmentations differ per rank

        self.restore()
        if isinstance(self.batches, SourceMix):
            self.batches.progress = self.progress
        self.last_eval = dict.fromkeys(TASKS[config.task].all_metric_names(config), float("nan"))  # until an epoch ends
        self.view: dict | None = None  # the run report's view of the held-out split, until the next report
        self.send = Reporter()
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                          enabled=self.device.type == "cuda")
        self.window = MetricsWindow(self.device)

    # ------------------------------------------------------------------------- the loop

    def run(self) -> None:
        """Train, then compare and export. A stream with too many undecodable rows ends the run
        instead, with the reason in its last report (callbacks.StopOnDataError raises it in the
        controller): raised here, Ray Train would restart the workers on the same rows."""
        try:
            self.train()
        except TooManySkippedRows as error:
            self.send({"step": self.progress.step, "epoch": self.progress.epoch, DATA_ERROR: str(error),
                       **self.data_counts()})
            self.send.flush()
            return
        self.finish()

    def train(self) -> None:
        """Epochs until the last step; each whole epoch ends with an evaluation."""
        while self.progress.step < self.total_steps and self.train_epoch():
            self.end_epoch()

    def train_epoch(self) -> bool:
        """The rest of the epoch in progress. Whether the epoch is whole: its batches ran out,
        rather than the steps (a stream's epoch is not known to be whole until it runs out)."""
        p, first_step = self.progress, self.progress.step
        for batch in self.batches.epoch(p.epoch, p.batch_in_epoch):
            self.step(batch)
            if p.step >= self.total_steps:
                return self.batches.stream is None and p.batch_in_epoch == self.batches.batches_per_epoch
        if p.step == first_step and p.batch_in_epoch == 0:
            raise RuntimeError(f"epoch {p.epoch} had no full batch of train.global_batch_size="
                               f"{self.config.train.global_batch_size}: {self.data_counts()}")
        return True

    def step(self, batch: dict) -> None:
        """One optimizer step; a report at the end of each metrics window, with a checkpoint every
        train.checkpoint_every steps (the last step's is `finish`'s)."""
        p, t = self.progress, self.config.train
        loss, stats = train_step(self.model, self.net, self.optimizer, batch, self.autocast, self.scheduler,
                                 t.grad_cache_chunk, self.config.optim.grad_clip, self.negatives, t.grad_cache_tokens)
        p.step, p.batch_in_epoch = p.step + 1, p.batch_in_epoch + 1
        p.anchors_without_positive_total += stats.anchors_without_positive
        p.empty_batches += stats.empty
        self.window.add(loss, stats, t.global_batch_size)
        save = p.step % t.checkpoint_every == 0 and p.step < self.total_steps
        if save or p.step % t.log_every == 0 or p.step == self.total_steps:
            self.accounts.check(whole_epoch=False)
            metrics = self.window.read(self.net.loss_fn, self.scheduler, self.world)
            self.report({**metrics, "empty_batches": p.empty_batches}, save=save)

    def end_epoch(self) -> None:
        """A whole epoch: its stream counts kept, then (unless it was the last step) an evaluation."""
        self.accounts.close_epoch(self.progress)
        self.progress.epoch, self.progress.batch_in_epoch = self.progress.epoch + 1, 0
        if self.progress.step < self.total_steps:
            self.evaluate()
            self.report({})

    def evaluate(self, towers: nn.Module | None = None) -> None:
        """The held-out metrics of `towers` (by default `whole_towers()`), reported with every
        report from now on; on rank 0, what the run report shows of the held-out split (the first
        source's), sent with the next report."""
        towers = self.whole_towers() if towers is None else towers
        self.last_eval = self.evaluate_sources(towers)
        if self.rank == 0:
            with evaluating(towers):
                self.view = self.task.report_view(towers, seed=self.config.train.seed) | {"hardware": self.hardware()}

    def whole_towers(self) -> nn.Module:
        """The towers with every weight on this worker: themselves, or under FSDP a copy gathered
        from the shards (a collective), which evaluation and exports run on: each rank embeds its
        own share of the held-out rows, and rank 0 alone the report's view."""
        if self.config.train.strategy != "fsdp":
            return self.net.towers
        weights = full_state_dict(self.net.towers)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            towers = self.task.build_towers(self.config, self.architecture)  # (its random init is not the run's draw)
        towers.load_state_dict(weights)
        return towers.to(self.device)

    def hardware(self) -> str:
        """Where the run trained, in words (the run report, the model cards)."""
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        hosts = sorted({w["host"] for w in self.workers})
        return (f"{self.world} Ray Train worker{'s' if self.world > 1 else ''} on {len(hosts)} "
                f"node{'s' if len(hosts) > 1 else ''} ({', '.join(hosts)}), {device}, torch {torch.__version__}")

    def evaluate_sources(self, towers: nn.Module) -> dict[str, float]:
        """The held-out metrics of `towers`: the data's, or each source's prefixed by its name."""
        if self.names is None:
            return evaluate_towers(self.task, towers)
        return {f"{name}_{key}": value for name, task in zip(self.names, self.tasks)
                for key, value in evaluate_towers(task, towers).items()}

    def baselines(self) -> dict[str, float]:
        if self.names is None:
            return self.task.baselines()
        return {f"{name}_{key}": value for name, task in zip(self.names, self.tasks) for key, value in task.baselines().items()}

    # ------------------------------------------------------------------------- reports and checkpoints

    def data_counts(self) -> dict[str, int]:
        """Rows lost to decoding and batching in one pass over the data, and anchors without a positive."""
        return {**self.accounts.metrics(self.progress),
                "anchors_without_positive_total": self.progress.anchors_without_positive_total}

    def report(self, metrics: dict, save: bool = False, final: nn.Module | None = None) -> None:
        """Every rank reports; with `save`, rank 0 attaches a checkpoint (every rank's RNG inside),
        with `final` (the whole towers) their exports in it too."""
        p = self.progress
        metrics = {"step": p.step, "epoch": p.epoch, "start_step": self.start_step, **self.last_eval,
                   **self.data_counts(), **metrics}
        if self.view:  # once: the report writer keeps it
            metrics[REPORT_VIEW], self.view = self.view, None
        rng_states = _all_ranks(rng_state(), self.world) if save else None
        sharded = self.config.train.strategy == "fsdp"  # then every rank writes its shards in the checkpoint
        if rng_states is None or (self.rank != 0 and not sharded):
            self.send(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            if sharded:
                save_shards(d, self.net, self.optimizer)
            if self.rank == 0:
                self.save(d, rng_states, export=metrics if final is not None else None, towers=final)
            self.send(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def save(self, directory: str, rng_states: list[dict], export: dict | None = None,
             towers: nn.Module | None = None) -> None:
        """A checkpoint's files: the state (weights, optimizer, schedule, queue, progress, RNGs;
        under FSDP the weights and optimizer are in the shards), where every rank ran, and with
        `export` (the final metrics) the files of the whole `towers` a user loads without Ray,
        each with its model card."""
        save_state(directory, self.net, self.optimizer, self.scheduler, self.progress, rng_states, self.negatives,
                   sharded=self.config.train.strategy == "fsdp")
        with open(os.path.join(directory, WORKERS_FILE), "w") as f:
            json.dump(self.workers, f, indent=1)
        if export:
            os.makedirs(os.path.join(directory, EXPORT_DIR))
            plain = merged(towers)  # LoRA's adapters merged: the usual files, and the adapters alone beside
            self.task.export(plain, os.path.join(directory, EXPORT_DIR))
            adapters = save_adapters(towers, os.path.join(directory, EXPORT_DIR), self.task.adapter_base)
            t = self.config.train  # the cards' snippets load from the run directory, where the driver copies them
            where = join_path(t.storage_path, t.name) if "://" not in t.storage_path else EXPORT_DIR
            write_cards(os.path.join(directory, EXPORT_DIR), self.task.exports(plain) + adapters, self.card_facts(export),
                        where)

    def card_facts(self, metrics: dict) -> Training:
        """How this run made its model, for the model cards: data, loss, batch, steps, hardware, figures."""
        c, t, task = self.config, self.config.train, self.task
        figures = {name: (metrics.get(f"{name}_trained"), metrics.get(f"{name}_untrained"),
                          metrics.get(f"{name}_{task.baseline_name}")) for name in self.last_eval}
        if c.dataset is None:
            datasets, data = [task.builtin_data], f"the built-in {task.builtin_data} data"
        else:
            datasets = [x.path for x in c.datasets]
            data = "; ".join(f"{x.format} {x.path}" for x in c.datasets)
        rows = metrics.get("stream_rows") or sum(x.data.train_rows or 0 for x in self.tasks)
        data += f" ({rows} training rows a pass, {metrics.get('skipped_rows', 0)} skipped)" if rows else ""
        return Training(name=t.name, task=c.task, base_model=task.base_model, data=data, datasets=datasets,
                        loss=c.loss.model_dump(), global_batch_size=t.global_batch_size, steps=self.progress.step,
                        hardware=self.hardware(), metrics=figures, baseline_name=task.baseline_name)

    def restore(self) -> None:
        """The latest checkpoint's state (this rank's RNG included), else a fresh start."""
        checkpoint = ray.train.get_checkpoint()
        self.progress = restore_state(checkpoint, self.net, self.optimizer, self.scheduler, self.rank, self.device,
                                      self.negatives, self.world, self.config.train.seed) if checkpoint else Progress()
        self.start_step = self.progress.step
        if checkpoint and self.rank == 0:
            with checkpoint.as_directory() as d, open(os.path.join(d, WORKERS_FILE)) as f:
                saved = len(json.load(f))
            if saved != self.world:
                t, shares = self.config.train, worker_shares(self.config.train, self.world, self.task.data.streamed)
                split = (f"each takes {shares[0]}" if len(set(shares)) == 1 else
                         f"they take {', '.join(map(str, shares))} (the stream's {t.stream_parts} parts split over them)")
                sys.stdout.write(f"[distributed_cl] resumed at step {self.start_step} on {self.world} workers (the "
                                 f"checkpoint's had {saved}): {split} rows of the same global batch of "
                                 f"{t.global_batch_size}\n")
                sys.stdout.flush()

    # ------------------------------------------------------------------------- the end

    def finish(self) -> None:
        """The trained towers against the same towers untrained (the same seed rebuilds them) and
        the task's baselines, in the last report, whose checkpoint holds the export."""
        towers = self.whole_towers()  # (under FSDP gathered once, for the evaluation and the exports)
        self.evaluate(towers)
        torch.manual_seed(self.config.train.seed)
        untrained = self.evaluate_sources(self.task.build_towers(self.config).to(self.device))
        final = {f"{name}_trained": value for name, value in self.last_eval.items()}
        final |= {f"{name}_untrained": value for name, value in untrained.items()}
        final["peak_memory_mib"] = max(_all_ranks(peak_memory_mib(self.device), self.world))  # the largest worker's
        self.report(final | self.baselines(), save=True, final=towers)
        self.send.flush()  # every rank's last report is in before the worker returns


def train_loop_per_worker(loop_config: dict) -> None:
    """What Ray Train runs in each worker. `loop_config`: {"config": Config.to_dict(), "data": a
    Ray object ref of the Splits, or None to load the config's data here}."""
    recipe = ContrastiveRecipe(Config.from_dict(loop_config["config"]))
    recipe.setup(loop_config.get("data"))
    recipe.run()
