"""The run configuration: YAML files in experiments/ and `--set key=value` overrides, composed of
the plug-ins' own option models and checked before Ray starts (errors name the field).

Every section but `train` belongs to a plug-in, which declares it beside its code: `loss` is the
options of the loss `loss.name` names (losses/, LOSSES), `optim` of the optimizer (optim.py),
`dataset` of a data format (data/formats.py, FORMATS), and each task (tasks/, TASKS) owns the
sections of its built-in data and towers (`data` and `model`, `text`, `image_text`). This module
only puts them together and holds the rules that span sections."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Discriminator, Field, NonNegativeInt, PositiveInt, Tag, create_model, model_validator

from distributed_cl.data.formats import FORMATS, DatasetOptions
from distributed_cl.data.sources import SourcesOptions, sources_of
from distributed_cl.losses import LOSSES
from distributed_cl.optim import OPTIMIZERS
from distributed_cl.options import (
    ConfigError,
    Options,
    absolute,
    choice,
    field_error,
    parse,
    resolve_paths,
    tagged_union,
    unknown_option,
)
from distributed_cl.tasks import TASKS
from distributed_cl.trackers import TRACKERS, missing_package

__all__ = ["Config", "ConfigError", "TrainOptions", "apply_override", "set_key"]


# each tracker's own options, `train.<tracker>` (train.mlflow.tracking_uri, train.wandb.project)
TrackerSections = create_model("TrackerSections", __base__=Options, __module__=__name__,
                               **{name: (cls.Options, Field(default_factory=cls.Options))
                                  for name, cls in TRACKERS.items() if cls.Options})


class TrainOptions(TrackerSections):
    """The `train` section: workers, batch, schedule, checkpoints (the loop's own options), and
    the trackers (`loggers`, each with its options beside)."""

    name: str = "simclr-fashion-mnist"  # run name; the same name and storage_path resume
    storage_path: str = "./runs"
    # Ray Train workers; [min, max]: elastic, the run goes on with as many as the cluster has in the
    # range (a lost node, or one that joins), the global batch the same at every count
    num_workers: PositiveInt | tuple[PositiveInt, PositiveInt] = 2
    # an elastic run looks this often for nodes that joined; on finding room for more workers it
    # restarts from the latest checkpoint with them (Ray Train's elastic_resize_monitor_interval_s)
    elastic_resize_interval_s: float = Field(60.0, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: PositiveInt = 1
    # processes per worker that prepare CPU-side batches (tokenising) ahead of the step; null:
    # 2 with a GPU, 0 on CPU, where the worker's cores are busy with the model
    loader_workers: NonNegativeInt | None = None
    global_batch_size: PositiveInt = 256
    max_steps: PositiveInt | None = 360  # stop after this many steps (null: run `epochs`)
    epochs: PositiveInt | None = None
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 2
    max_failures: NonNegativeInt = 1  # worker-group restarts from the latest checkpoint
    knn_k: PositiveInt = 20
    seed: int = 0
    verbose: bool = False  # also Ray's start-up notices and Ray Train's own log lines (worker group, reports)
    # gradient caching (grad_cache.py): embed the local batch this many samples at a time (each
    # chunk's texts cut to its longest), so a batch whose activations do not fit still takes one
    # exact step; null: one pass (faster)
    grad_cache_chunk: PositiveInt | None = None
    # gradient caching by a token budget: the local batch's rows sorted by length and cut into
    # chunks of at most this many padded tokens (rows x each side's longest text; and at most
    # grad_cache_chunk rows where that is set too), each chunk padded to its own longest texts
    grad_cache_tokens: PositiveInt | None = None
    # ddp: each worker holds the whole model; fsdp: the towers' blocks sharded over the workers
    # (FSDP2), for towers whose weights, gradients and optimizer state do not fit one device
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # recompute each transformer block's activations in the backward instead of keeping them
    activation_checkpointing: bool = False
    # torch.compile each transformer block of the towers (the whole towers where they have none)
    compile: bool = False
    # > 0 (e.g. 0.99): the queue's keys come from an exponential moving average of the towers,
    # updated after each optimizer step with this decay (MoCo's momentum encoder); needs loss.queue_size
    momentum: float = Field(0.0, ge=0, lt=1)
    # a directory where each worker of a streamed run appends one line per batch (epoch, batch,
    # a digest of every row): what each rank trained on, to audit determinism and resumes
    batch_log: str | None = None
    # where every report goes besides metrics.csv (always written): tensorboard, mlflow, wandb
    loggers: list[Annotated[str, choice(TRACKERS)]] = ["tensorboard"]

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: both num_workers where it is fixed."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else tuple(n)

    @property
    def elastic(self) -> bool:
        return self.worker_range[0] != self.worker_range[1]

    @property
    def stream_parts(self) -> int:
        """The parts Ray Data splits a streamed dataset into: one a worker, and in an elastic run as
        many as the most workers, whatever the number running (each reads a run of them)."""
        return self.worker_range[1]

    def tracker_options(self) -> dict[str, Options | None]:
        return {name: getattr(self, name, None) for name in TRACKERS}

    @model_validator(mode="after")
    def _consistent(self) -> TrainOptions:
        if len(set(self.loggers)) < len(self.loggers):
            raise field_error("loggers", f"names a tracker twice: {self.loggers}")
        for name in self.loggers:
            if why := missing_package(name):
                raise field_error("loggers", why)
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs")
        low, high = self.worker_range
        if low > high:
            raise field_error("num_workers", f"num_workers=[{low}, {high}]: the minimum is above the maximum")
        uneven = [n for n in range(low, high + 1) if self.global_batch_size % n]
        if uneven and low == high:
            raise field_error("global_batch_size", f"global_batch_size={self.global_batch_size} is not divisible by "
                              f"train.num_workers={self.num_workers}")
        if uneven:
            raise field_error("num_workers", f"num_workers=[{low}, {high}]: train.global_batch_size="
                              f"{self.global_batch_size} is not divisible by {', '.join(map(str, uneven))} workers; "
                              "every count of an elastic range must split the global batch into equal shares "
                              "(the same negatives and gradients at every count)")
        if not self.name or "/" in self.name:
            raise field_error("name", f"must be a non-empty name without '/', got {self.name!r}")
        return self

    def absolute_paths(self) -> TrainOptions:
        return self.model_copy(update={"storage_path": absolute(self.storage_path),
                                       "batch_log": self.batch_log and absolute(self.batch_log)})


# the sections whose plug-in one field names: (section, registry, field, default)
TAGGED = (("loss", LOSSES, "name", "ntxent"), ("optim", OPTIMIZERS, "name", "adamw"),
          ("dataset", FORMATS, "format", "imagefolder"))


def _one_or_sources(value: Any) -> str:
    many = isinstance(value, SourcesOptions) or (isinstance(value, dict) and "sources" in value)
    return "<sources>" if many else "<one>"


# `dataset`: one source (its format names its options), or `sources:`, a list of them
DATASET = Annotated[Annotated[tagged_union(*TAGGED[2][1:]), Tag("<one>")] | Annotated[SourcesOptions, Tag("<sources>")],
                    Discriminator(_one_or_sources)]


class ConfigBase(Options):
    """The rules between sections; the sections themselves are composed below from the registries."""

    @property
    def datasets(self) -> list[DatasetOptions]:
        """The sources of training data: `dataset`, or each of `dataset.sources` (none: built-in data)."""
        return sources_of(self.dataset)

    def source_configs(self) -> list[Config]:
        """A config per source of training data, its `dataset` that source (this config where
        there is one source, or none)."""
        if not isinstance(self.dataset, SourcesOptions):
            return [self]
        return [self.model_copy(update={"dataset": source}) for source in self.dataset.sources]

    @property
    def pair_labelled(self) -> bool:
        """Whether the rows carry 0/1 pair labels (dataset.columns.is_same; every source alike)."""
        return any(d.pair_labelled for d in self.datasets)

    @property
    def labelled_loss(self) -> bool:
        """Whether the loss needs class labels (then every global batch holds m samples per class).
        Pair labels are not classes: the positives of a pair-labelled row are in the row itself."""
        return self.loss.labelled and not self.pair_labelled

    @model_validator(mode="after")
    def _between_sections(self) -> ConfigBase:
        loss, train, queue = self.loss, self.train, getattr(self.loss, "queue_size", 0)
        if self.labelled_loss and train.global_batch_size % loss.m:
            raise field_error("loss.m", f"loss.m={loss.m} does not divide train.global_batch_size={train.global_batch_size}")
        if train.momentum and not queue:
            raise ValueError("train.momentum makes the keys of the negative queue: set loss.queue_size too")
        if train.grad_cache_tokens and "text" not in TASKS[self.task].sides:
            raise field_error("train.grad_cache_tokens", f"train.grad_cache_tokens counts text tokens: the {self.task} "
                              "task has no texts (use train.grad_cache_chunk)")
        if train.strategy == "fsdp" and train.momentum:
            raise ValueError("train.momentum keeps a whole momentum copy of the towers on every worker: it does not "
                             "go with train.strategy=fsdp (use the queue without momentum, or ddp)")
        if train.strategy == "fsdp" and (why := TASKS[self.task].unshardable(self)):
            raise field_error("train.strategy", f"train.strategy=fsdp: {why}; use train.strategy=ddp")
        for row in ("negative", "is_same"):
            if any(getattr(d.columns, row) is not None for d in self.datasets) and row not in loss.rows:
                users = ", ".join(name for name, options in LOSSES.items() if row in options.rows)
                raise ValueError(f"dataset.columns.{row}: loss.name={loss.name} does not use it (the losses that "
                                 f"do: {users})")
        if loss.needs_is_same and not self.pair_labelled:
            raise ValueError(f"loss.name={loss.name} trains on pair-labelled rows: set dataset.columns.is_same "
                             "(a 0/1 column of your data)")
        if self.pair_labelled and queue:
            raise ValueError("loss.queue_size with dataset.columns.is_same: pair labels name pairs within a batch, "
                             "so past keys would match today's by accident; use a queue with class labels")
        for dataset in self.datasets:
            columns = dataset.side_columns(TASKS[self.task].sides)
            if self.labelled_loss and "label" not in columns:
                raise ValueError(f"dataset.columns.label is required: loss.name={loss.name} learns from class "
                                 "labels (or dataset.columns.is_same: pair-labelled rows)")
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """The config of a mapping of sections (a YAML file's, or `to_dict`'s), checked field by field."""
        if isinstance(raw, dict):
            for section, registry, field, default in TAGGED:
                unknown_option(section, raw.get(section), registry, field, default)
        return parse(cls, raw)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
        """A YAML file (or the defaults) with `--set` overrides, checked, its files included."""
        raw: dict[str, Any] = {}
        if path is not None:
            raw = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for item in overrides:
            apply_override(raw, item)
        config = cls.from_dict(raw)
        config.check_files()
        return config

    def check_files(self) -> None:
        """What reading the disk can find before Ray starts: the data's files and columns, model
        directories and weights (the worker's `from_dict` does not read them again)."""
        many = isinstance(self.dataset, SourcesOptions)
        for config in self.source_configs():
            where = f"dataset.sources[{config.dataset.name}]: " if many else ""  # which source the error is of
            try:
                if config.dataset is not None:
                    config.dataset.check_files(TASKS[self.task].sides, self.train.global_batch_size)
                TASKS[self.task].check_benchmark(config)
            except (ValueError, FileNotFoundError, ImportError, OSError) as e:
                raise ConfigError(f"{where}{e}") from None
        try:
            TASKS[self.task].check_files(self)
        except (ValueError, FileNotFoundError, ImportError, OSError) as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def resolve_paths(self) -> Config:
        """Every local path made absolute, before any worker starts (they chdir)."""
        return resolve_paths(self)


def _task_sections() -> dict[str, Any]:
    """Each task's own sections, with their defaults (the image task's `data` and `model`, ...)."""
    return {name: (options, Field(default_factory=options))
            for task in TASKS.values() for name, options in task.sections.items()}


Config = create_model(
    "Config",
    __base__=ConfigBase,
    __module__=__name__,
    task=(Annotated[str, choice(TASKS)], "image"),
    dataset=(DATASET | None, None),  # your own data (one source, or `sources:`); null: the task's built-in
    **_task_sections(),
    loss=(tagged_union(*TAGGED[0][1:]), Field(default_factory=LOSSES["ntxent"])),
    optim=(tagged_union(*TAGGED[1][1:]), Field(default_factory=OPTIMIZERS["adamw"])),
    train=(TrainOptions, Field(default_factory=TrainOptions)),
)
Config.__doc__ = __doc__


def apply_override(raw: dict, item: str) -> None:
    """`section.field=value` (as `--set` takes it; the value read as YAML) into a raw config mapping."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set takes field=value or section.field=value, got {item!r}")
    set_key(raw, key, yaml.safe_load(text))


def set_key(raw: dict, key: str, value: Any) -> None:
    """`value` at the dotted `key` of a raw config mapping (sections made as needed). Naming
    another plug-in (`loss.name=siglip` over a file's `loss: {name: clip, temperature: 0.07}`)
    drops the section's options that the new one does not take, with a warning."""
    *sections, name = key.split(".")
    target = raw
    for i, section in enumerate(sections):
        target = target.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{'.'.join(sections[: i + 1])} is not a section")
    for section, registry, field, default in TAGGED:
        if sections == [section] and name == field and value in registry and value != target.get(field, default):
            dropped = sorted(set(target) - set(registry[value].model_fields))
            for option in dropped:
                del target[option]
            if dropped:
                warnings.warn(f"{key}={value}: {', '.join(f'{section}.{o}' for o in dropped)} dropped "
                              f"({value} does not take it)", stacklevel=2)
    target[name] = value
