"""Driver side: connect to Ray, build and run the TorchTrainer, log progress, export results.

All Ray plumbing lives here; the per-worker loop is in train_loop.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import ray
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distributed_cl.callbacks import ProgressLogger, StopOnDataError
from distributed_cl.config import Config, ConfigError
from distributed_cl.data.formats import TooManySkippedRows, decoded_dataset
from distributed_cl.data.stream import PartRun, part_runs
from distributed_cl.data.table import Splits
from distributed_cl.losses import LossStats
from distributed_cl.options import join_path
from distributed_cl.report import ReportWriter
from distributed_cl.tasks import TASKS, Task
from distributed_cl.trackers import TrackedRun, TrackerCallback, flatten, prepare_trackers
from distributed_cl.train_loop import EXPORT_DIR, REPORT_VIEW, stream_name, train_loop_per_worker

# Ray Train's controller collects reports when it polls the workers, every 2 s by default, and
# ray.train.report blocks until then (measured: 1.9 s per report). Poll every 0.25 s instead.
# Hugging Face's loading and saving bars would bury the progress lines.
JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # workers tokenise on their own threads or in loader processes


def connect_ray(log_to_driver: bool = True, verbose: bool = False) -> None:
    """Join the cluster this runs on (RAY_ADDRESS, or the head that `ray start` recorded on this
    node, as under `ray submit`), else start a local Ray of its own. Not `address="auto"`: that
    also joins any Ray process it finds on the machine, such as another user's notebook.
    `log_to_driver=False` keeps the actors' own log lines (Ray Train's controllers and workers)
    out of this console. Unless `verbose`, Ray's notices that need no action stay out of it too
    (its start-up lines; warnings and errors still show)."""
    if ray.is_initialized():
        return
    import logging

    env = dict(JOB_ENV)
    if not verbose:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if not _cluster_address():
            # a laptop is not preempted: Ray Train's watcher of spot-instance notices only logs an
            # ERROR line about its own constructor (kept on clusters, where it does its job)
            env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"))
    ray.init(runtime_env={"env_vars": env}, log_to_driver=log_to_driver,
             logging_level=logging.INFO if verbose else logging.WARNING)


def _cluster_address() -> str | None:
    """The cluster ray.init would join: RAY_ADDRESS, or the head address `ray start` recorded on
    this node (Ray's own lookup, a private function: if it moves, assume a cluster)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None)
    except (ImportError, AttributeError):
        return "unknown"


# Filesystems that every node of a cluster can mount at the same path (fuse covers gcsfuse,
# mountpoint-s3, JuiceFS and the like).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "glusterfs", "ceph", "fuse")


def filesystem_type(path: str) -> str:
    """The type of the filesystem that holds `path`, from /proc/mounts ("" where there is none)."""
    path, mount_point, kind = os.path.realpath(path), "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mount, fstype, *_ = line.split()
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(mount_point):
                    mount_point, kind = mount, fstype
    except OSError:
        pass
    return kind


def warn_unless_shared(storage_path: str) -> None:
    """Ray Train's workers write checkpoints from their own nodes: on a cluster of several nodes a
    path on one node's disk loses them (the driver finds no checkpoint, a resume starts over)."""
    nodes = sum(node["Alive"] for node in ray.nodes())
    kind = filesystem_type(storage_path)
    if nodes > 1 and kind.split(".")[0] not in SHARED_FILESYSTEMS:
        print(f"[distributed_cl] warning: train.storage_path {storage_path} is on a {kind or 'local'} filesystem "
              f"and this cluster has {nodes} nodes: use s3://, gs:// or a path every node mounts (NFS)",
              file=sys.stderr, flush=True)


class StreamParts(DataConfig):
    """Ray Data's split of each streamed dataset into `parts`, however many workers run: worker w of
    W reads the w-th run of consecutive parts (as even as they divide). With one part a worker,
    Ray Train's own split; in an elastic run, as many as its most workers, so that a global batch
    (part 0's rows, part 1's, ...) and the position in the epoch do not depend on the count."""

    def __init__(self, parts: int, **options) -> None:
        super().__init__(**options)
        self.parts = parts

    def configure(self, datasets: dict, world_size: int, worker_handles, worker_node_ids, **kwargs) -> list[dict]:
        if self.parts == world_size:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        per_part = super().configure(datasets, self.parts, None, None, **kwargs)
        return [{name: PartRun(run.start, [per_part[i][name] for i in run]) for name in datasets}
                for run in part_runs(self.parts, world_size)]


def prepare_data(config: Config) -> tuple[list[Splits], dict]:
    """The data, read here once for every worker, a source at a time (one, or each of
    dataset.sources): the splits held in memory (a Ray object the workers fetch), and the Ray Data
    pipeline of each streamed training split (TorchTrainer splits it across the workers). Bad rows
    were counted while decoding."""
    task = TASKS[config.task]
    every, datasets = [], {}
    for source in config.source_configs():
        splits = task.load_data(source)
        x, named = source.dataset, f"dataset.sources[{source.dataset.name}]: " if source is not config else ""
        if splits.streamed:
            if config.train.epochs is not None and splits.train_rows is None:
                raise ConfigError(f"{named}train.epochs needs the training split's size, which this stream does not "
                                  "tell before reading it all: set train.max_steps")
            datasets[stream_name(source, config)] = decoded_dataset(x, task.sides, "train", config.train.seed,
                                                                    config.train.verbose)
            part_rows = config.train.global_batch_size // config.train.stream_parts
            if config.labelled_loss and part_rows % config.loss.m:
                raise ConfigError(f"{named}loss.m={config.loss.m}: each of the stream's {config.train.stream_parts} "
                                  f"parts gives {part_rows} rows to a global batch, not a multiple of m (every group "
                                  "of m comes from one part): make train.global_batch_size a multiple of "
                                  f"{config.train.stream_parts * config.loss.m}")
            free = ray.cluster_resources().get("CPU", 0) - config.train.worker_range[1] * config.train.cpus_per_worker
            if free < x.decode_cpus:
                raise ConfigError(
                    f"{named}dataset: streaming decodes in Ray Data tasks of dataset.decode_cpus={x.decode_cpus} CPU, "
                    f"but the {config.train.worker_range[1]} workers x train.cpus_per_worker={config.train.cpus_per_worker} "
                    f"leave {free:g} of this cluster's CPUs: lower train.cpus_per_worker or dataset.decode_cpus, add "
                    "CPU nodes, or set dataset.cache=true")
        if splits.skipped_rows:
            print(f"[distributed_cl] {named}skipped {splits.skipped_rows} rows that did not decode or had an empty "
                  f"text, e.g. {'; '.join(splits.skipped_examples[:3])}", file=sys.stderr, flush=True)
        every.append(splits)
    return every, datasets


def run(config: Config, output_json: str | None = None, callbacks: list = (), console: bool = True,
        tracked_as: str | None = None, group: str | None = None) -> dict[str, Any]:
    """Train (or resume the run with the same name and storage path) and return its summary.
    `callbacks`: more Ray Train callbacks (a sweep trial's FiguresToTune); `console=False` keeps
    progress lines and the final table out of the console (metrics.csv is still written);
    `tracked_as`, `group`: the run's name in the trackers (default train.name) and its group there
    (a sweep's trials: their parameters, and the sweep's name)."""
    config = config.resolve_paths()
    t = config.train
    local_storage = "://" not in t.storage_path
    run_dir = os.path.join(t.storage_path, t.name) if local_storage else None
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
    task = TASKS[config.task]
    metric_names = task.all_metric_names(config)
    loss_keys = getattr(type(config.loss.build()), "log_keys", ())  # what the loss logs: metrics.csv's columns
    run_path = join_path(t.storage_path, t.name)  # run_dir, or its URI
    tracked = TrackedRun(key=run_path, name=tracked_as or t.name, run_dir=run_dir,
                         params=flatten(config.to_dict()), group=group)
    summary_keys = (*(f"{name}_{which}" for name in metric_names for which in ("trained", "untrained", task.baseline_name)),
                    "skipped_rows", "peak_memory_mib")
    # the trackers' servers reached and their runs found (a resume) or created, before Ray starts
    trackers = TrackerCallback(prepare_trackers(t, tracked), tracked, summary_keys)
    connect_ray(verbose=t.verbose)
    if local_storage:
        warn_unless_shared(t.storage_path)
    splits, datasets = prepare_data(config)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    preserve_order = bool(config.datasets) and all(x.deterministic for x in config.datasets)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "data": ray.put(splits)},
        datasets=datasets,
        # ordered blocks, and Ray Data's split then ignores locality: the same rows reach the same rank
        dataset_config=StreamParts(t.stream_parts, datasets_to_split=list(datasets),
                                   execution_options=ExecutionOptions(preserve_order=preserve_order)),
        scaling_config=ScalingConfig(num_workers=t.num_workers if not t.elastic else t.worker_range, use_gpu=t.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=t.elastic_resize_interval_s),
        run_config=RunConfig(
            name=t.name,
            storage_path=t.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            # Ray Train's worker-group start-up lines only with train.verbose (its warnings always)
            logging_config=LoggingConfig(log_level="INFO" if t.verbose else "WARNING"),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[StopOnDataError(), ProgressLogger(run_dir, t.max_steps, metric_names, console, loss_keys=loss_keys,
                                                         stats_keys=LossStats.log_keys),
                       ReportWriter(run_path, t.name, metric_names, loss_keys, config.to_dict(),
                                    task.baseline_name, REPORT_VIEW), trackers, *callbacks],
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.ControllerError as e:  # StopOnDataError's, with the workers' reason
        if isinstance(e.controller_failure, TooManySkippedRows):
            raise e.controller_failure from None
        raise
    metrics = dict(result.metrics or {})
    summary: dict[str, Any] = {"name": t.name, "task": config.task, "run_dir": run_dir, "metrics": metrics,
                               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if result.checkpoint and run_dir:  # the exported model files, next to metrics.csv
        with result.checkpoint.as_directory() as d:
            export = Path(d, EXPORT_DIR)
            if export.is_dir():
                shutil.copytree(export, run_dir, dirs_exist_ok=True)
                summary["exported"] = sorted(os.path.join(run_dir, p.name) for p in export.iterdir())
                for key, name in task.summary_files.items():  # e.g. "encoder": encoder.pt
                    if Path(export, name).exists():
                        summary[key] = os.path.join(run_dir, name)
    if console:
        print(final_table(metrics, task, metric_names))
    if output_json:
        Path(output_json).write_text(json.dumps(summary, indent=2))
    return summary


def final_table(metrics: dict[str, Any], task: type[Task], metric_names: tuple[str, ...]) -> str:
    """The held-out figures: trained, untrained and baseline side by side, one metric a line, and
    the rows lost to decoding."""
    columns = ("trained", "untrained", task.baseline_name)
    lines = [f"{'held-out ' + task.name:<20}" + "".join(f"{c:>12}" for c in columns)]
    for name in metric_names:
        cells = [metrics.get(f"{name}_{which}") for which in columns]
        lines.append(f"{name:<20}" + "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in cells))
    lines.append(f"{'skipped rows':<20}{metrics.get('skipped_rows', 0):>12}")
    if "peak_memory_mib" in metrics:  # the largest worker's (the GPU allocator's peak with --use-gpu)
        lines.append(f"{'peak memory (MiB)':<20}{metrics['peak_memory_mib']:>12.0f}")
    return "\n".join(lines)
