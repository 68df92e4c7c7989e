"""Experiment trackers (`train.loggers`): TensorBoard, MLflow and Weights & Biases, each
registered once here with its options (`train.<name>`). metrics.csv is always written.

One writer a run: Ray Train's controller, which sees every report once (rank 0's view), through
`TrackerCallback`; a 64-worker run opens one tracker run, not 64. The driver prepares each
tracker before Ray Train starts (`Tracker.prepare`: defaults resolved, the server reached, the
run found or created), so that a bad URI fails early, and a resumed run (same storage path and
name, after a killed driver or a restart) finds and continues the same tracker run by its key.
Like callbacks.py, this module imports no torch: the controller unpickles the callback."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ray.train import UserCallback

from distributed_cl.options import ConfigError, Options

RUN_KEY_TAG = "distributed_cl.run_key"  # MLflow: the tag that finds a run again on resume
SWEEP_TAG = "distributed_cl.sweep"


@dataclass(frozen=True)
class TrackedRun:
    """What the trackers know of a run. `key`: <storage_path>/<name>, the same when it resumes;
    `name`: as the tracker shows it (a sweep's trial: its parameters); `group`: the sweep's name."""

    key: str
    name: str
    run_dir: str | None  # local run directory (TensorBoard's event files); None with remote storage
    params: dict[str, Any] = field(default_factory=dict)  # the resolved config, flattened
    group: str | None = None

    @property
    def id(self) -> str:
        """A stable id from the key: W&B's run id, so that a resumed run is the same run."""
        return hashlib.sha1(self.key.encode()).hexdigest()[:16]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as tracker params: {"loss.temperature": 0.1, ...}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """A report's figures a tracker can plot: numbers, not NaN, without the step counters."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not math.isnan(v) and k not in ("step", "start_step")}


class Tracker:
    """A tracker: `prepare` runs in the driver and returns what the instance needs (its options
    resolved, the run it opened), the instance runs in the controller: `log` at every report,
    `finish` at the last with the final table and the final checkpoint's path (a directory or a URI)."""

    name: ClassVar[str]
    Options: ClassVar[type[Options] | None] = None
    package: ClassVar[tuple[str, str] | None] = None  # (the module it needs, the extra that installs it)

    @classmethod
    def check(cls, options: Options | None, storage_path: str) -> None:
        """What can be known before Ray starts (a login, a server that answers), without side effects."""

    @classmethod
    def prepare(cls, options: Options | None, run: TrackedRun, storage_path: str) -> Any:
        cls.check(options, storage_path)
        return options

    def __init__(self, prepared: Any, run: TrackedRun) -> None:
        self.prepared, self.run = prepared, run

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, final: dict[str, float], step: int, checkpoint: str | None) -> None:
        pass

    @classmethod
    def log_files(cls, options: Options | None, run: TrackedRun, files: list[Path], storage_path: str) -> None:
        """A sweep's own results (results.csv, plots, best.yaml), once, as a run of the sweep's group."""


TRACKERS: dict[str, type[Tracker]] = {}


def register(cls: type[Tracker]) -> type[Tracker]:
    TRACKERS[cls.name] = cls
    return cls


def missing_package(name: str) -> str | None:
    """Why tracker `name` cannot run here (its package is not installed), or None."""
    need = TRACKERS[name].package
    if need and importlib.util.find_spec(need[0]) is None:
        return f"{name} needs the {need[0]} package: pip install 'distributed_cl[{need[1]}]'"
    return None


# ----------------------------------------------------------------------------- TensorBoard


@register
class TensorBoard(Tracker):
    """Event files in <run_dir>/tensorboard (local storage only): every report's figures against
    the step, the config as text, the final table under final/."""

    name = "tensorboard"  # tensorboardX's writer is a dependency of the package

    def __init__(self, prepared: None, run: TrackedRun) -> None:
        super().__init__(prepared, run)
        self.writer = None
        if run.run_dir:
            from tensorboardX import SummaryWriter

            directory = Path(run.run_dir, "tensorboard")
            new = not directory.exists()
            self.writer = SummaryWriter(str(directory))
            if new:  # a resumed run's config is already there
                table = "\n".join(f"| {k} | {as_text(v)} |" for k, v in run.params.items())
                self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def finish(self, final: dict[str, float], step: int, checkpoint: str | None) -> None:
        if self.writer:
            for key, value in final.items():
                self.writer.add_scalar(f"final/{key}", value, step)
            self.writer.close()


# ----------------------------------------------------------------------------- MLflow


class MlflowOptions(Options):
    # null: $MLFLOW_TRACKING_URI, else a SQLite store beside the runs (<storage_path>/mlflow.db)
    tracking_uri: str | None = None
    experiment: str | None = None  # null: the sweep's name in a sweep, else "distributed_cl"
    artifacts: bool = True  # log the exports and the final checkpoint as the run's artifacts


@dataclass(frozen=True)
class MlflowRun:
    """The MLflow run the driver found or created, for the controller."""

    tracking_uri: str
    run_id: str
    artifacts: bool


def mlflow_name(key: str) -> str:
    """MLflow allows letters, digits, _ - . space : / in names: recall@1 becomes recall_at_1."""
    return key.replace("@", "_at_")


@register
class Mlflow(Tracker):
    """An MLflow run (MlflowClient: no global active run in the controller): params, metrics with
    their step, the final table as the last values of the `*_trained`/`*_untrained` metrics, the
    exports and final checkpoint as artifacts. Found again on resume by the tag RUN_KEY_TAG."""

    name = "mlflow"
    Options = MlflowOptions
    package = ("mlflow", "mlflow")

    @staticmethod
    def client(tracking_uri: str):
        import logging

        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # its "View run at" lines
        for name in ("mlflow.store.db.utils", "alembic"):  # a new SQLite store's set-up lines
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri)

    @classmethod
    def check(cls, options: MlflowOptions, storage_path: str) -> None:
        """A server that does not answer fails here in seconds (MLflow's client retries for minutes)."""
        uri, _ = cls.store(options, storage_path)
        if uri.startswith(("http://", "https://")):
            import urllib.request

            try:
                urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=15)
            except OSError as e:
                raise ConfigError(f"train.mlflow.tracking_uri: no MLflow server answers at {uri} ({e})") from None

    @classmethod
    def store(cls, options: MlflowOptions, storage_path: str) -> tuple[str, str | None]:
        """The tracking URI, and where a new experiment keeps its artifacts: a server's own place,
        or beside a SQLite store of our own (not the controller's working directory)."""
        uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri, None
        if "://" in storage_path:
            raise ConfigError("train.mlflow.tracking_uri: needed with a remote train.storage_path "
                              f"({storage_path}): an MLflow server's URI, e.g. http://host:5000")
        return f"sqlite:///{os.path.join(storage_path, 'mlflow.db')}", Path(storage_path, "mlartifacts").as_uri()

    @staticmethod
    def experiment_id(client, name: str, artifact_location: str | None) -> str:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another trial of the sweep created it first
            return client.get_experiment_by_name(name).experiment_id

    @classmethod
    def prepare(cls, options: MlflowOptions, run: TrackedRun, storage_path: str) -> MlflowRun:
        from mlflow.entities import Param

        cls.check(options, storage_path)
        uri, artifact_location = cls.store(options, storage_path)
        client = cls.client(uri)
        experiment = cls.experiment_id(client, options.experiment or run.group or "distributed_cl", artifact_location)
        key = hashlib.sha1(run.key.encode()).hexdigest()
        found = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
        if found:
            run_id, logged = found[0].info.run_id, found[0].data.params
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {RUN_KEY_TAG: key, "distributed_cl.storage": run.key, **({SWEEP_TAG: run.group} if run.group else {})}
            run_id, logged = client.create_run(experiment, run_name=run.name, tags=tags).info.run_id, {}
        params = [Param(k, as_text(v)[:6000]) for k, v in run.params.items() if k not in logged]  # a resume logs none again
        for lo in range(0, len(params), 100):  # MLflow's limit per batch
            client.log_batch(run_id, params=params[lo : lo + 100])
        return MlflowRun(uri, run_id, options.artifacts)

    def __init__(self, target: MlflowRun, run: TrackedRun) -> None:
        super().__init__(target, run)
        self.mlflow, self.run_id = self.client(target.tracking_uri), target.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.mlflow.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), v, now, step) for k, v in metrics.items()])

    def finish(self, final: dict[str, float], step: int, checkpoint: str | None) -> None:
        if checkpoint and self.prepared.artifacts:
            with local_directory(checkpoint) as directory:  # export/ and the rest of the checkpoint
                for path in sorted(Path(directory).iterdir()):
                    if path.name == "export":  # train_loop.EXPORT_DIR (a module that imports torch)
                        self.mlflow.log_artifacts(self.run_id, str(path), "export")
                    elif path.is_dir():
                        self.mlflow.log_artifacts(self.run_id, str(path), f"checkpoint/{path.name}")
                    else:
                        self.mlflow.log_artifact(self.run_id, str(path), "checkpoint")
        self.mlflow.set_terminated(self.run_id, "FINISHED")

    @classmethod
    def log_files(cls, options: MlflowOptions, run: TrackedRun, files: list[Path], storage_path: str) -> None:
        target = cls.prepare(options, run, storage_path)
        client = cls.client(target.tracking_uri)
        for path in files:
            client.log_artifact(target.run_id, str(path))
        client.set_terminated(target.run_id, "FINISHED")


# ----------------------------------------------------------------------------- Weights & Biases


class WandbOptions(Options):
    project: str = "distributed_cl"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: files only, `wandb sync` them later
    dir: str | None = None  # where W&B writes its files; null: the run directory (else W&B's default)


@register
class Wandb(Tracker):
    """A W&B run whose id comes from the run's key (a resumed run continues it): the config,
    every report's figures with the step, the final table as the run's summary, and the final
    checkpoint as a model artifact by reference (its path or URI; nothing is uploaded twice)."""

    name = "wandb"
    Options = WandbOptions
    package = ("wandb", "wandb")

    @classmethod
    def check(cls, options: WandbOptions, storage_path: str) -> None:
        if options.mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            raise ConfigError("train.wandb.mode=online needs a W&B login on this machine: run `wandb login` or set "
                              "WANDB_API_KEY (or set train.wandb.mode=offline, and `wandb sync` the files later)")

    @classmethod
    def prepare(cls, options: WandbOptions, run: TrackedRun, storage_path: str) -> WandbOptions:
        cls.check(options, storage_path)
        return options.model_copy(update={"dir": options.dir or run.run_dir})

    @staticmethod
    def start(options: WandbOptions, **init: Any):
        """wandb.init with the options, quiet: no console capture, no system metrics."""
        import wandb

        if options.dir:
            os.makedirs(options.dir, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True)
        return wandb.init(project=options.project, entity=options.entity, mode=options.mode, dir=options.dir,
                          settings=settings, reinit="create_new", **init)

    def __init__(self, options: WandbOptions, run: TrackedRun) -> None:
        super().__init__(options, run)
        self.wandb = self.start(options, id=run.id, resume="allow", name=run.name, group=run.group, config=run.params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.wandb.log(metrics, step=step)

    def finish(self, final: dict[str, float], step: int, checkpoint: str | None) -> None:
        import wandb

        self.wandb.summary.update(final)
        if checkpoint:
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"run": self.run.key})
            artifact.add_reference(checkpoint if "://" in checkpoint else Path(checkpoint).absolute().as_uri(),
                                   checksum=False)
            self.wandb.log_artifact(artifact)
        self.wandb.finish()

    @classmethod
    def log_files(cls, options: WandbOptions, run: TrackedRun, files: list[Path], storage_path: str) -> None:
        import wandb

        handle = cls.start(cls.prepare(options, run, storage_path), name=f"{run.name}-results", group=run.group)
        artifact = wandb.Artifact(f"sweep-{run.id}", type="sweep-results")
        for path in files:
            artifact.add_file(str(path))
        handle.log_artifact(artifact)
        handle.finish()


def _netrc_has_wandb() -> bool:
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return base in hosts


# ----------------------------------------------------------------------------- the callback


@contextlib.contextmanager
def local_directory(path: str):
    """The final checkpoint as a local directory (downloaded first when it is a URI)."""
    if "://" not in path:
        yield path
        return
    import tempfile

    import pyarrow.fs

    with tempfile.TemporaryDirectory() as copy:
        pyarrow.fs.copy_files(path, copy)
        yield copy


def check_trackers(train: Any) -> None:
    """Each of `train.loggers` (the config's train section) checked, before Ray starts."""
    for name in train.loggers:
        TRACKERS[name].check(train.tracker_options().get(name), train.storage_path)


def prepare_trackers(train: Any, run: TrackedRun) -> list[tuple[str, Any]]:
    """In the driver, before Ray Train starts: each of `train.loggers` (the config's train
    section) resolved (servers reached, runs found or created), for `TrackerCallback`."""
    return [(name, TRACKERS[name].prepare(train.tracker_options().get(name), run, train.storage_path))
            for name in train.loggers]


class TrackerCallback(UserCallback):
    """Runs in Ray Train's controller: the trackers, opened at the first report (a restarted
    controller opens them again and continues the same runs), fed every report, finished at the
    last. A tracker that fails mid-run is reported on the console and dropped: training goes on."""

    def __init__(self, trackers: list[tuple[str, Any]], run: TrackedRun, summary_keys: tuple[str, ...]) -> None:
        self.trackers, self.run, self.summary_keys = trackers, run, summary_keys  # summary: the final table's
        self._open: dict[str, Tracker] | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]
        if self._open is None:
            self._open = {}
            for name, options in self.trackers:
                self._guard(name, lambda n=name, o=options: self._open.__setitem__(n, TRACKERS[n](o, self.run)))
        values, step = numeric(m), int(m["step"])
        for name, tracker in list(self._open.items()):
            self._guard(name, lambda t=tracker: t.log(values, step))
        if "peak_memory_mib" in m:  # the last report: the final table and the final checkpoint
            final = {k: values[k] for k in self.summary_keys if k in values}
            for name, tracker in list(self._open.items()):
                self._guard(name, lambda t=tracker: t.finish(final, step, checkpoint.path if checkpoint else None))
            self._open = {}

    def _guard(self, name: str, call) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 (a tracker's outage must not end the training)
            print(f"[distributed_cl] {name}: {type(e).__name__}: {e}; the run goes on without {name}",
                  file=sys.stderr, flush=True)
            if self._open is not None:
                self._open.pop(name, None)

