"""The trackers' options and early errors, without Ray. (A training run and a sweep report to a
real MLflow server, W&B offline and TensorBoard in test_train_cli.py and test_sweep.py.)"""

from pathlib import Path

import pytest

import train
from distributed_cl.config import Config, ConfigError
from distributed_cl.trackers import TRACKERS, Mlflow, TrackedRun, flatten, numeric
from distributed_cl.tune import trial_label

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "tests" / "configs" / "digits.yaml"


def test_each_tracker_owns_its_options_and_bad_names_are_refused():
    config = Config.load(DIGITS, ["train.loggers=[mlflow, wandb]", "train.mlflow.experiment=exp",
                                  "train.wandb.mode=offline", "train.wandb.project=p"])
    options = config.train.tracker_options()
    assert (options["mlflow"].experiment, options["wandb"].mode, options["wandb"].project) == ("exp", "offline", "p")
    assert Config.load(DIGITS).train.loggers == ["tensorboard"]  # metrics.csv and TensorBoard, as before
    with pytest.raises(ConfigError, match="train.loggers.0 must be one of tensorboard, mlflow, wandb; got 'neptune'"):
        Config.load(DIGITS, ["train.loggers=[neptune]"])
    with pytest.raises(ConfigError, match="train.loggers: names a tracker twice"):
        Config.load(DIGITS, ["train.loggers=[mlflow, mlflow]"])
    with pytest.raises(ConfigError, match="train.wandb.mode"):
        Config.load(DIGITS, ["train.wandb.mode=sometimes"])
    with pytest.raises(ConfigError, match="unknown config key train.mlflow.uri"):
        Config.load(DIGITS, ["train.mlflow.uri=http://x"])


def no_ray(monkeypatch) -> None:
    """Connecting to Ray fails the test: the error must come before (a Ray the session started
    for other tests may be up in this process, so ray.is_initialized() cannot tell)."""
    from distributed_cl import trainer

    def connect(*args, **kwargs):
        raise AssertionError("Ray was reached")

    monkeypatch.setattr(trainer, "connect_ray", connect)


def test_a_missing_tracker_package_names_its_extra_before_ray_starts(monkeypatch, capsys):
    no_ray(monkeypatch)
    monkeypatch.setattr(TRACKERS["wandb"], "package", ("no_such_wandb_module", "wandb"))
    assert train.main(["--config", str(DIGITS), "--set", "train.loggers=[wandb]"]) == 2
    assert ("config error: train.loggers: wandb needs the no_such_wandb_module package: "
            "pip install 'distributed_cl[wandb]'") in capsys.readouterr().err


def test_unreachable_server_or_missing_login_fail_before_ray_starts(tmp_path, monkeypatch, capsys):
    from ray_cluster import free_port

    no_ray(monkeypatch)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    dead = f"http://127.0.0.1:{free_port()}"
    base = ["--config", str(DIGITS), "--storage-path", str(tmp_path / "runs")]
    assert train.main([*base, "--set", "train.loggers=[mlflow]", "--set", f"train.mlflow.tracking_uri={dead}"]) == 2
    assert f"config error: train.mlflow.tracking_uri: no MLflow server answers at {dead}" in capsys.readouterr().err
    assert train.main([*base, "--set", "train.loggers=[wandb]"]) == 2
    assert "config error: train.wandb.mode=online needs a W&B login" in capsys.readouterr().err
    sweep = tmp_path / "s.yaml"
    sweep.write_text("metric: knn_top1\nmode: max\nepochs: 1\nspace: {loss.temperature: {grid: [0.1]}}\n")
    assert train.main(["sweep", "--config", str(DIGITS), "--sweep", str(sweep), "--set", "train.loggers=[wandb]"]) == 2
    assert "config error: train.wandb.mode=online needs a W&B login" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.mlflow.tracking_uri: needed with a remote train.storage_path"):
        Mlflow.check(Config.load(DIGITS).train.mlflow, "s3://bucket/runs")


def test_mlflow_default_store_sits_beside_the_runs(tmp_path, monkeypatch):
    """No URI: a SQLite store under the storage path, and artifacts beside it, read back with
    MLflow's own client; a second prepare of the same run (a resume) finds it again."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    options = Config.load(DIGITS).train.mlflow
    run = TrackedRun(key=str(tmp_path / "runs" / "a"), name="a", run_dir=None, params={"loss.temperature": 0.1,
                                                                                      "train.loggers": ["mlflow"]})
    (tmp_path / "runs").mkdir()
    first = Mlflow.prepare(options, run, str(tmp_path / "runs"))
    assert first.tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert Mlflow.prepare(options, run, str(tmp_path / "runs")).run_id == first.run_id  # the same run
    client = MlflowClient(first.tracking_uri)
    logged = client.get_run(first.run_id)
    assert logged.data.params == {"loss.temperature": "0.1", "train.loggers": '["mlflow"]'}
    assert client.get_experiment(logged.info.experiment_id).artifact_location == (tmp_path / "runs" / "mlartifacts").as_uri()


def test_params_metrics_and_trial_names():
    assert flatten({"loss": {"name": "infonce", "temperature": 0.1}, "task": "text"}) == {
        "loss.name": "infonce", "loss.temperature": 0.1, "task": "text"}
    assert numeric({"step": 5, "start_step": 0, "loss": 1.5, "recall@1": float("nan"), "epoch": 1, "ok": True,
                    "source": "qa"}) == {"loss": 1.5, "epoch": 1.0}
    assert trial_label({"loss.temperature": 0.1, "train.global_batch_size": 32}) == "temperature=0.1,global_batch_size=32"
    assert TrackedRun("a/b", "b", None).id == TrackedRun("a/b", "other name", None).id != TrackedRun("a/c", "b", None).id


@pytest.fixture
def wandb_service_of_its_own(monkeypatch):
    """W&B's service that wandb.init starts in this process is shut down after the test, and its
    address (WANDB_SERVICE, which wandb puts in os.environ) taken out again: train.py processes
    that later tests start would inherit it and share the service, where a killed run's stream
    stays open and takes the records of the run that resumes it."""
    import wandb

    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    yield
    wandb.teardown()


@pytest.mark.usefixtures("wandb_service_of_its_own")
def test_the_callback_feeds_wandb_and_tensorboard_one_run_each(tmp_path):
    """TrackerCallback as the controller drives it, on reports as the workers send them: a trial
    of a sweep in W&B (offline: its files read back) and TensorBoard; then the sweep's results
    run. (The real thing end to end: test_train_cli.py, test_sweep.py.)"""
    from types import SimpleNamespace

    from trackers_read import tensorboard_scalars, wandb_offline_runs

    from distributed_cl.trackers import TrackerCallback, Wandb, prepare_trackers

    train = Config.load(DIGITS, ["train.loggers=[tensorboard, wandb]", "train.wandb.mode=offline"]).train
    run_dir = tmp_path / "trials" / "t1"
    run_dir.mkdir(parents=True)
    run = TrackedRun(str(run_dir), "temperature=0.1", str(run_dir), {"loss.temperature": 0.1}, group="temps")
    train = train.model_copy(update={"storage_path": str(tmp_path)})
    callback = TrackerCallback(prepare_trackers(train, run), run, ("knn_top1_trained", "peak_memory_mib"))
    (tmp_path / "ckpt" / "export").mkdir(parents=True)
    (tmp_path / "ckpt" / "export" / "towers.pt").write_bytes(b"weights")
    callback.after_report(None, [{"step": 5, "epoch": 0, "loss": 2.5, "lr": 0.1, "knn_top1": float("nan")}], None)
    callback.after_report(None, [{"step": 10, "epoch": 1, "loss": 2.0, "lr": 0.05, "knn_top1": 0.5}], None)
    callback.after_report(None, [{"step": 10, "epoch": 1, "knn_top1": 0.5, "knn_top1_trained": 0.5,
                                  "peak_memory_mib": 99.0}], SimpleNamespace(path=str(tmp_path / "ckpt")))
    (trial,) = wandb_offline_runs(run_dir)
    assert (trial["id"], trial["name"], trial["group"]) == (run.id, "temperature=0.1", "temps")
    assert trial["config"] == {"loss.temperature": 0.1}
    assert trial["history"]["loss"] == {5: 2.5, 10: 2.0} and trial["history"]["knn_top1"] == {10: 0.5}  # no NaN
    assert trial["summary"]["knn_top1_trained"] == 0.5 and trial["summary"]["peak_memory_mib"] == 99.0
    (model,) = trial["artifacts"]
    assert model["refs"] == {"export/towers.pt": (tmp_path / "ckpt" / "export" / "towers.pt").as_uri()}
    scalars, _ = tensorboard_scalars(run_dir / "tensorboard")
    assert scalars["loss"] == {5: 2.5, 10: 2.0} and scalars["final/knn_top1_trained"] == {10: 0.5}

    results = tmp_path / "results.csv"
    results.write_text("trial_id,final_knn_top1\nt1,0.5\n")
    Wandb.log_files(train.wandb, TrackedRun(str(tmp_path), "temps", str(tmp_path), group="temps"), [results], "")
    (sweep,) = wandb_offline_runs(tmp_path)
    assert (sweep["name"], sweep["group"]) == ("temps-results", "temps")
    assert [a["type"] for a in sweep["artifacts"]] == ["sweep-results"] and "results.csv" in sweep["artifacts"][0]["refs"]
