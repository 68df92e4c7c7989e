"""Ray Tune sweeps over any config field: the sweep YAML, checked before Ray starts.

A sweep YAML (experiments/sweeps/):

    metric: knn_top1            # a held-out metric the task reports
    mode: max                   # max | min
    epochs: 3                   # the budget: every trial trains this many epochs, so runs with
                                # different batch sizes compare at the same number of samples
    num_samples: 1              # repeats of the space (each grid point num_samples times)
    seed: 0                     # seeds the draws of choice/uniform/loguniform: same seed, same trials
    max_concurrent_trials: 2   # at most; fewer if the cluster cannot hold that many trials' workers
    fixed: {train.cpus_per_worker: 0.5}             # optional: config values for every trial
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or {name: fifo}; in epochs
    space:
      loss.temperature: {grid: [0.05, 0.1, 0.2, 0.5]}
      train.global_batch_size: {grid: [128, 256, 512]}
      optim.lr: {loguniform: [0.001, 0.01]}         # also {choice: [...]}, {uniform: [lo, hi]}
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Discriminator, Field, PositiveInt, Tag, field_validator, model_validator
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from distributed_cl.config import Config, ConfigError, TrainOptions, apply_override, set_key
from distributed_cl.options import Options, absolute, join_path, parse, tagged_union


class SweepError(ValueError):
    """A sweep YAML key is unknown, of the wrong type, or has an impossible value."""


# ----------------------------------------------------------------------------- the sweep YAML


class AshaOptions(Options):
    name: Literal["asha"] = "asha"
    grace_period: PositiveInt = 1  # epochs every trial gets before it can be stopped
    reduction_factor: int = Field(2, ge=2)  # ASHA keeps the best 1/reduction_factor at each rung
    max_t: PositiveInt | None = None  # epochs; default: the sweep's budget

    def build(self, epochs: int) -> ASHAScheduler:
        return BudgetASHA(epochs, time_attr="epoch", grace_period=self.grace_period,
                          reduction_factor=self.reduction_factor, max_t=self.max_t or epochs)


class FifoOptions(Options):
    name: Literal["fifo"] = "fifo"

    def build(self, epochs: int) -> FIFOScheduler:
        return FIFOScheduler()


SCHEDULERS = {"asha": AshaOptions, "fifo": FifoOptions}


class Grid(Options):
    grid: list = Field(min_length=1)

    def search(self):
        return tune.grid_search(self.grid)

    def values(self) -> list:
        return self.grid


class Choice(Options):
    choice: list = Field(min_length=1)

    def search(self):
        return tune.choice(self.choice)

    def values(self) -> list:
        return self.choice


class Uniform(Options):
    uniform: tuple[float, float]

    @field_validator("uniform")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not bounds[0] < bounds[1]:
            raise ValueError(f"needs lo < hi, got {list(bounds)}")
        return bounds

    def search(self):
        return tune.uniform(*self.uniform)

    def values(self) -> list:  # what the config is checked with: both ends
        return list(self.uniform)


class LogUniform(Options):
    loguniform: tuple[float, float]

    @field_validator("loguniform")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0 < bounds[0] < bounds[1]:
            raise ValueError(f"needs 0 < lo < hi, got {list(bounds)}")
        return bounds

    def search(self):
        return tune.loguniform(*self.loguniform)

    def values(self) -> list:
        return list(self.loguniform)


# the distributions of a swept field: {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}
SPACE_KINDS = {"grid": Grid, "choice": Choice, "uniform": Uniform, "loguniform": LogUniform}


def _space_kind(value: Any) -> str | None:
    """The tag of a dimension: its one key (`grid`, ...), written `<grid>` as the config's unions are."""
    keys = list(value) if isinstance(value, dict) else list(type(value).model_fields) if isinstance(value, Options) else []
    return f"<{keys[0]}>" if len(keys) == 1 else None


Dimension = Annotated[
    Union[tuple(Annotated[kind, Tag(f"<{name}>")] for name, kind in SPACE_KINDS.items())],  # noqa: UP007
    Discriminator(_space_kind, custom_error_type="choice",
                  custom_error_message="must be one of " + ", ".join(f"{{{k}: ...}}" for k in SPACE_KINDS))]
SET_BY_THE_SWEEP = ("train.name", "train.storage_path", "train.max_steps", "train.epochs")


class SweepSpec(Options):
    """A sweep YAML. Its space and fixed values are checked by building the training config of
    every grid point (`check_against`), with the config's own models."""

    metric: str  # a held-out metric the task reports
    mode: Literal["max", "min"] = "max"
    epochs: PositiveInt = 1
    num_samples: PositiveInt = 1
    seed: int = Field(0, ge=0)  # the search's random draws (choice, uniform, loguniform)
    max_concurrent_trials: PositiveInt = 2
    scheduler: tagged_union(SCHEDULERS, "name", "asha") = Field(default_factory=AshaOptions)
    space: dict[str, Dimension] = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict)  # config values every trial uses (not swept)

    @model_validator(mode="after")
    def _keys(self) -> SweepSpec:
        for key in self.space:
            if key in SET_BY_THE_SWEEP:
                raise ValueError(f"space.{key}: the sweep sets {key} itself")
            if key in self.fixed:
                raise ValueError(f"fixed.{key} is also in space")
        return self

    @property
    def grid_size(self) -> int:
        """Trials the space defines: the product of the grids, times num_samples."""
        return self.num_samples * math.prod(len(d.grid) for d in self.space.values() if isinstance(d, Grid))

    def check_against(self, config: Config, metrics: tuple[str, ...]) -> None:
        """The metric is one the config's task reports, and the config with the fixed values and
        each point of the space (every grid and choice value, each range's ends) is a valid config."""
        if self.metric not in metrics:
            raise SweepError(f"metric: the {config.task} task reports {', '.join(metrics)}; got {self.metric!r}")
        base = config.to_dict()
        for key, value in self.fixed.items():
            set_key(base, key, value)
        keys = list(self.space)
        for point in itertools.product(*(self.space[k].values() for k in keys)):
            raw = copy.deepcopy(base)
            for key, value in zip(keys, point):
                set_key(raw, key, value)
            try:
                Config.from_dict(raw)
            except ConfigError as e:
                where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, point))
                raise SweepError(f"the config at {where} (with the fixed values): {e}") from None


def load_sweep(path: str | Path, config: Config) -> SweepSpec:
    """Read and check a sweep YAML against the base `config` it sweeps."""
    from distributed_cl.tasks import TASKS

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {e}") from None
    try:
        spec = parse(SweepSpec, raw, top="sweep")
    except ConfigError as e:
        raise SweepError(str(e).replace("unknown config key", "unknown sweep key")) from None
    spec.check_against(config, TASKS[config.task].all_metric_names(config))
    return spec


def with_fixed(config: Config, spec: SweepSpec, overrides: list[str] = ()) -> Config:
    """The sweep's base config: `config` with the sweep's fixed values, then `overrides`
    ("key=value", as --set takes them: the command line wins over the sweep file), validated."""
    raw = config.to_dict()
    for key, value in spec.fixed.items():
        set_key(raw, key, value)
    for item in overrides:
        apply_override(raw, item)
    fixed = Config.from_dict(raw)
    fixed.check_files()
    return fixed


def search_algorithm(spec: SweepSpec, max_concurrent: int = 0):
    """Tune's grid and random search, its random draws seeded by the sweep's seed, at most
    `max_concurrent` trials at a time (0: no limit). It must hold the limit itself: Tune applies
    TuneConfig's max_concurrent_trials only to the search algorithm it makes."""
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's search space: one entry per swept field, keyed by its dotted name."""
    return {key: dimension.search() for key, dimension in spec.space.items()}


# ----------------------------------------------------------------------------- running a sweep

RESULTS_FILE = "results.csv"
BEST_FILE = "best.yaml"
TRIALS_DIR = "trials"  # each trial's Ray Train run (checkpoints, metrics.csv) under the sweep


def trial_config(base: dict, params: dict, epochs: int, name: str, storage_path: str) -> Config:
    """The training config of one trial: the base with the trial's values, trained for the
    sweep's epochs under a fixed (storage_path, name), so that a restored trial resumes."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_key(raw, key, value)
    raw["train"].update(epochs=epochs, max_steps=None, name=name, storage_path=storage_path)
    return Config.from_dict(raw)


def trial_label(params: dict) -> str:
    """A trial's name from its values: "temperature=0.1,global_batch_size=32"."""
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float) else
                    f"{key.rsplit('.', 1)[-1]}={value}" for key, value in params.items())


def trial_name(trial, repeats: int = 1) -> str:
    """Tune's name of a trial (its console table, its trackers' run): its values, and its number
    when the sweep repeats each point (num_samples > 1)."""
    label = trial_label(trial.config)
    return f"{label}#{int(trial.trial_id.rsplit('_', 1)[-1])}" if repeats > 1 else label


def _run_trial(params: dict, base: dict, epochs: int, storage_path: str, sweep: str) -> None:
    """A Tune trial: the driver of one Ray Train run, whose reports reach Tune (and ASHA)."""
    from distributed_cl import trainer  # torch and the tasks: loaded only where a sweep runs
    from distributed_cl.callbacks import FiguresToTune
    from distributed_cl.train_loop import REPORT_VIEW

    context = tune.get_context()
    config = trial_config(base, params, epochs, context.get_trial_id(), storage_path)
    trainer.run(config, callbacks=[FiguresToTune(drop=REPORT_VIEW)], console=False, tracked_as=context.get_trial_name(), group=sweep)


def run_sweep(config: Config, spec: SweepSpec, storage_path: str, name: str, verbose: bool = False) -> str:
    """Run the sweep (or resume the one with this name and storage path) and write its
    results.csv, plots and best.yaml into <storage_path>/<name>/, a local directory or a URI
    (s3://, gs://). Returns that path. The console shows Tune's trial table; `verbose` adds every
    trial's Ray Train log lines."""
    from distributed_cl import trainer

    user_config, config = config, config.resolve_paths()  # trial workers chdir: absolute paths
    storage_path = absolute(storage_path)
    sweep_path = join_path(storage_path, name)
    trainer.connect_ray(log_to_driver=verbose, verbose=verbose)
    concurrent = _concurrent_trials(config, spec.max_concurrent_trials)
    trainable = tune.with_parameters(_run_trial, base=config.to_dict(), epochs=spec.epochs,
                                     storage_path=join_path(sweep_path, TRIALS_DIR), sweep=name)
    # The trial only waits on its Ray Train workers, which hold the real resources: it holds no CPU
    # (Tune needs some resource in the request: 1 MiB of memory), so trials x workers fill the CPUs.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 2**20})
    if tune.Tuner.can_restore(sweep_path):
        print(f"[distributed_cl] resuming the sweep in {sweep_path}: finished trials are kept, unfinished ones "
              "continue from their latest checkpoints")
        tuner = tune.Tuner.restore(sweep_path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        scheduler = spec.scheduler.build(spec.epochs)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                        search_alg=search_algorithm(spec, concurrent), num_samples=spec.num_samples,
                                        trial_name_creator=functools.partial(trial_name, repeats=spec.num_samples)),
            # verbose 1: the trial table every 30 s, a box as each trial starts and ends
            run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=2 if verbose else 1),
        )
    rows = results_table(tuner.fit(), spec)
    best = best_row(rows, spec)
    # best.yaml keeps the paths as the user gave them (./runs, ~/.cache), not this machine's
    best_config = (trial_config(user_config.to_dict(), best["params"], spec.epochs, f"{name}-best",
                                user_config.train.storage_path) if best else None)
    with _writable(sweep_path) as out:
        files = write_results(out, rows, spec, best_config, name)
        # beside the trials' runs (the default MLflow store is theirs, under trials/)
        log_sweep_results(config.train, name, sweep_path, files, join_path(sweep_path, TRIALS_DIR))
    print(summary_table(rows, spec))
    print(f"[distributed_cl] {RESULTS_FILE}, plots and {BEST_FILE if best else 'no best config'} in {sweep_path}")
    return sweep_path


class BudgetASHA(ASHAScheduler):
    """ASHA that never stops a trial at the report of its last epoch: stopping it there saves no
    compute, and would end the trial before it exports its model and shuts its workers down."""

    def __init__(self, epochs: int, **asha) -> None:
        super().__init__(**asha)
        self.epochs = epochs

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self.epochs:
            return self.CONTINUE  # the trial ends by itself after this report
        return super().on_trial_result(tune_controller, trial, result)


@contextlib.contextmanager
def _writable(path: str):
    """A local directory whose files end up at `path`: `path` itself, or for a URI a temporary
    directory uploaded there afterwards (pyarrow's filesystems, as Ray's storage uses)."""
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
        yield Path(path)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
        filesystem, remote = pyarrow.fs.FileSystem.from_uri(path)
        pyarrow.fs.copy_files(tmp, remote, destination_filesystem=filesystem)


def _concurrent_trials(config: Config, wanted: int) -> int:
    """At most `wanted`, and no more trials than the cluster's CPUs and GPUs hold workers for:
    a trial whose workers cannot be placed would time out instead of queueing."""
    import ray

    t = config.train
    workers = t.worker_range[1]
    per_trial = {"CPU": workers * t.cpus_per_worker, "GPU": workers if t.use_gpu else 0}
    cluster = ray.cluster_resources()
    fits = min(int(cluster.get(k, 0) // v) for k, v in per_trial.items() if v)
    if fits < 1:
        raise SweepError(f"one trial needs {per_trial} for its {workers} workers; the cluster has {cluster}")
    if fits < wanted:
        print(f"[distributed_cl] {fits} trial(s) at a time: each needs {per_trial}, the cluster has "
              f"{ {k: cluster.get(k, 0) for k in per_trial} } (lower train.cpus_per_worker to run more)")
    return min(wanted, fits)


def results_table(results: tune.ResultGrid, spec: SweepSpec) -> list[dict]:
    """One row per trial: its values, how it ended, its final and best metric (Tune's
    dataframes of each trial's last and best report)."""
    last = results.get_dataframe().set_index("trial_id")
    best = results.get_dataframe(filter_metric=spec.metric, filter_mode=spec.mode).set_index("trial_id")
    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        final = last.loc[trial_id] if trial_id in last.index else {}
        epochs = int(final.get("epoch", 0) or 0)
        if result.error is not None:
            status = "failed"
        else:
            status = "completed" if epochs >= spec.epochs else "early_stopped"
        rows.append({
            "trial_id": trial_id,
            "params": {key: result.config.get(key) for key in spec.space},
            "status": status,
            "early_stopped": status == "early_stopped",
            "epochs": epochs,
            "steps": int(final.get("step", 0) or 0),
            f"final_{spec.metric}": _metric(last, trial_id, spec.metric),
            f"best_{spec.metric}": _metric(best, trial_id, spec.metric),
            "error": "" if result.error is None else str(result.error).strip().splitlines()[-1][:500],
        })
    return sorted(rows, key=lambda r: [_sort_key(v) for v in r["params"].values()])


def _metric(frame, trial_id: str, metric: str) -> float:
    return float(frame.loc[trial_id].get(metric, math.nan)) if trial_id in frame.index else math.nan


def _sort_key(value) -> tuple:
    """Numbers by value (64 before 128), anything else by its text after them."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, str(value))


def best_row(rows: list[dict], spec: SweepSpec) -> dict | None:
    """The trial with the best metric at the end of its run: what its best.yaml trains to."""
    metric = f"final_{spec.metric}"
    scored = [r for r in rows if r[metric] == r[metric]]  # not NaN
    if not scored:
        return None
    sign = 1 if spec.mode == "max" else -1
    return max(scored, key=lambda r: sign * r[metric])


def write_results(sweep_dir: Path, rows: list[dict], spec: SweepSpec, best_config: Config | None = None,
                  name: str | None = None) -> list[Path]:
    """results.csv, the plots, best.yaml (the best trial's whole training config) and report.html
    (all of them on one page) in `sweep_dir`; returns those files."""
    import csv

    from distributed_cl.report import write_sweep_report

    columns = ["trial_id", *spec.space, "status", "early_stopped", "epochs", "steps",
               f"final_{spec.metric}", f"best_{spec.metric}", "error"]
    flat = [{**{k: v for k, v in row.items() if k != "params"}, **row["params"]} for row in rows]
    with open(sweep_dir / RESULTS_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(flat)
    plots = plot_results(sweep_dir, rows, spec)
    files = [sweep_dir / RESULTS_FILE, *plots]
    if best_config is not None:
        (sweep_dir / BEST_FILE).write_text(yaml.safe_dump(best_config.to_dict(), sort_keys=False))
        files.append(sweep_dir / BEST_FILE)
    files.append(write_sweep_report(sweep_dir, name or sweep_dir.name, flat, columns, plots,
                                    best_config.to_dict() if best_config is not None else None))
    return files


def log_sweep_results(train: TrainOptions, name: str, sweep_path: str, files: list[Path], storage_path: str) -> None:
    """The sweep's results.csv, plots and best.yaml, once, to each tracker that keeps files (a run
    named after the sweep, in the sweep's group beside its trials)."""
    from distributed_cl.trackers import TRACKERS, TrackedRun

    run = TrackedRun(key=sweep_path, name=name, run_dir=None if "://" in sweep_path else sweep_path, group=name)
    for logger in train.loggers:
        TRACKERS[logger].log_files(train.tracker_options().get(logger), run, files, storage_path)


def _axes(spec: SweepSpec) -> tuple[str, str | None]:
    """The x axis (temperature when swept) and the series (batch size when swept)."""
    keys = list(spec.space)
    x = "loss.temperature" if "loss.temperature" in keys else keys[0]
    rest = [k for k in keys if k != x]
    series = "train.global_batch_size" if "train.global_batch_size" in rest else (rest[0] if rest else None)
    return x, series


def plot_results(sweep_dir: Path, rows: list[dict], spec: SweepSpec) -> list[Path]:
    """<metric>_vs_<x>.png: each trial's metric at the end of its run against x (temperature when
    swept), one line per series value (batch size when swept), trials stopped early as open
    circles; heatmap.png: x by series, when both are grids. Repeats of a point are averaged;
    failed trials are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x, series = _axes(spec)
    metric = f"final_{spec.metric}"
    points: dict = {}  # (series value, x value) -> [(metric, stopped early)]
    for r in rows:
        if r["status"] != "failed" and r[metric] == r[metric]:
            key = (r["params"].get(series) if series else None, r["params"][x])
            points.setdefault(key, []).append((r[metric], r["early_stopped"]))
    mean = {key: float(np.mean([v for v, _ in vs])) for key, vs in points.items()}
    stopped = {key for key, vs in points.items() if any(s for _, s in vs)}
    paths = [sweep_dir / f"{spec.metric}_vs_{x.split('.')[-1]}.png"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if series and not isinstance(spec.space[series], (Grid, Choice)):
        # a continuous series (a learning rate drawn per trial): points coloured by its value
        log = isinstance(spec.space[series], LogUniform)
        norm = (matplotlib.colors.LogNorm if log else matplotlib.colors.Normalize)(*spec.space[series].values())
        for early in (False, True):
            keys = [k for k in points if (k in stopped) == early]
            colours = plt.cm.viridis(norm([k[0] for k in keys]))
            ax.scatter([k[1] for k in keys], [mean[k] for k in keys], s=60 if early else 40, zorder=3,
                       facecolors="white" if early else colours, edgecolors=colours,
                       label=("stopped early" if early else "ran its budget") if keys else None)
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=series)
    else:
        lines = sorted({key[0] for key in points}, key=_sort_key)
        for value in lines:
            keys = sorted((key for key in points if key[0] == value), key=lambda key: _sort_key(key[1]))
            (line,) = ax.plot([k[1] for k in keys], [mean[k] for k in keys], marker="o",
                              label=f"{series.split('.')[-1]} = {value}" if series else None)
            early = [k for k in keys if k in stopped]
            ax.scatter([k[1] for k in early], [mean[k] for k in early], s=90, facecolors="white",
                       edgecolors=line.get_color(), zorder=3,
                       label="stopped early" if early and value == lines[0] else None)
    if x in ("loss.temperature", "optim.lr"):
        ax.set_xscale("log")
    xs_seen = sorted({key[1] for key in points}, key=_sort_key)
    if all(_sort_key(v)[0] == 0 for v in xs_seen):  # numbers: a tick at each value tried
        ax.set_xticks(xs_seen, [f"{v:g}" for v in xs_seen])
        ax.minorticks_off()
    ax.set_xlabel(x)
    ax.set_ylabel(f"{spec.metric} at the end of the trial")
    ax.set_title(f"{sweep_dir.name}: {spec.metric}, {spec.epochs} epoch(s) per trial")
    if series or stopped:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if series and all(isinstance(spec.space[k], Grid) for k in (x, series)):
        xs, ys = spec.space[x].grid, spec.space[series].grid
        grid = np.array([[mean.get((y, v), np.nan) for v in xs] for y in ys])
        fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2, 0.8 * len(ys) + 1.5))
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_yticks(range(len(ys)), [str(v) for v in ys])
        ax.set_xlabel(x)
        ax.set_ylabel(series)
        for i, y in enumerate(ys):
            for j, v in enumerate(xs):
                if (y, v) in mean:
                    label = f"{mean[y, v]:.4f}" + (" *" if (y, v) in stopped else "")
                    light = image.norm(mean[y, v]) > 0.6  # dark text on viridis' light end
                    ax.text(j, i, label, ha="center", va="center", color="black" if light else "white", fontsize=8)
        fig.colorbar(image, label=f"{spec.metric}" + (" (* stopped early)" if stopped else ""))
        fig.tight_layout()
        paths.append(sweep_dir / "heatmap.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def summary_table(rows: list[dict], spec: SweepSpec) -> str:
    """The sweep's trials, one a line, in columns as wide as their contents."""
    final, best = f"final_{spec.metric}", f"best_{spec.metric}"
    head = [*spec.space, "status", "epochs", "steps", final, best]
    body = [[*(r["params"][k] for k in spec.space), r["status"], r["epochs"], r["steps"], f"{r[final]:.4f}",
             f"{r[best]:.4f}"] for r in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(head, *body)]
    return "\n".join("  ".join(f"{str(c):>{w}}" for c, w in zip(line, widths)) for line in [head, *body])
