"""Ray Tune sweeps: the sweep YAML checked before Ray starts, a real ASHA sweep on digits with
2 workers per trial, a failing trial recorded, best.yaml training, and a killed driver resuming."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray_cluster import token_auth_cluster
from test_train_cli import ROOT

import train
from distributed_cl.config import Config
from distributed_cl.tune import SweepError, SweepSpec, best_row, load_sweep, plot_results, summary_table, with_fixed

DIGITS = ROOT / "tests" / "configs" / "digits.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_sweep(tmp_path, name="sweep.yaml", **keys) -> Path:
    sweep = {"metric": "knn_top1", "mode": "max", "epochs": 3, "max_concurrent_trials": 2,
             "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
             "fixed": {"train.cpus_per_worker": 0.5, "train.log_every": 5, "train.checkpoint_every": 10},
             "space": {"loss.temperature": {"grid": [0.05, 0.2]}, "train.global_batch_size": {"grid": [32, 64]}}}
    sweep.update(keys)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep))
    return path


# ----------------------------------------------------------------------------- the sweep YAML


def test_shipped_sweeps_validate_against_their_configs():
    for config, sweep in [("image_simclr.yaml", "image.yaml"), ("text_wordnet.yaml", "text.yaml"),
                          ("image_text_emoji.yaml", "image_text.yaml")]:
        base = Config.load(ROOT / "experiments" / config)
        spec = load_sweep(ROOT / "experiments" / "sweeps" / sweep, base)
        with_fixed(base, spec)
    spec = load_sweep(ROOT / "experiments/sweeps/image.yaml", Config.load(ROOT / "experiments/image_simclr.yaml"))
    assert spec.grid_size >= 12  # the README's measured sweep


@pytest.mark.parametrize(
    "keys,match",
    [
        ({"metric": "accuracy"}, "metric: the image task reports knn_top1"),
        ({"mode": "maximum"}, "mode: Input should be 'max' or 'min'"),
        ({"epochs": 0}, "epochs: Input should be greater than 0"),
        ({"num_samples": "two"}, "num_samples: Input should be a valid integer"),
        ({"scheduler": {"name": "pbt"}}, "scheduler.name must be one of asha, fifo"),
        ({"scheduler": {"name": "asha", "grace": 1}}, "unknown sweep key scheduler.grace"),
        ({"scheduler": {"name": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor: Input should be greater than or equal to 2"),
        ({"space": {"loss.temprature": {"grid": [0.1]}}}, "the config at loss.temprature=0.1 .*unknown config key loss.temprature"),
        ({"space": {"loss": {"grid": [0.1]}}}, "the config at loss=0.1 .*loss must be a mapping"),
        ({"space": {"loss.temperature": {"grid": []}}}, r"space.loss.temperature.grid: List should have at least 1 item"),
        ({"space": {"loss.temperature": {"range": [0.1, 1]}}}, r"space.loss.temperature must be one of \{grid"),
        ({"space": {"loss.temperature": {"loguniform": [0, 1]}}}, r"space.loss.temperature.loguniform: needs 0 < lo < hi"),
        ({"space": {"loss.temperature": {"uniform": [0.5, 0.1]}}}, r"space.loss.temperature.uniform: needs lo < hi"),
        ({"space": {"train.global_batch_size": {"grid": [64, "big"]}}}, "the config at train.global_batch_size='big' .*train.global_batch_size: Input should be a valid integer"),
        ({"space": {"train.name": {"grid": ["a"]}}}, "the sweep sets train.name itself"),
        ({"space": {}}, "space: Dictionary should have at least 1 item"),
        ({"fixed": {"train.cpus_per_workers": 0.5}}, "unknown config key train.cpus_per_workers"),
        ({"budget": 3}, "unknown sweep key budget"),
        ({"space": {"data.eval_bank_size": {"grid": [0, -1]}}},  # every point's config is built: a bad one stops it
         r"the config at data.eval_bank_size=-1 .*data.eval_bank_size: Input should be greater than or equal to 0"),
        ({"space": {"train.global_batch_size": {"grid": [64, 63]}}},
         "the config at train.global_batch_size=63 .*not divisible by train.num_workers=2"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ],
)
def test_bad_sweep_yaml_names_the_key(tmp_path, keys, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(write_sweep(tmp_path, **keys), Config.load(DIGITS))


def test_fixed_values_apply_and_the_command_line_wins_over_them(tmp_path):
    config = Config.load(DIGITS)
    spec = load_sweep(write_sweep(tmp_path), config)
    base = with_fixed(config, spec)
    assert (base.train.cpus_per_worker, base.train.log_every) == (0.5, 5)
    base = with_fixed(config, spec, ["train.cpus_per_worker=2", "train.use_gpu=true"])
    assert (base.train.cpus_per_worker, base.train.use_gpu, base.train.log_every) == (2.0, True, 5)


def test_bad_sweep_exits_2_before_ray_starts(tmp_path, capsys):
    assert train.main(["sweep", "--config", str(DIGITS), "--sweep", str(write_sweep(tmp_path, mode="best"))]) == 2
    assert "sweep error: mode: Input should be 'max' or 'min'" in capsys.readouterr().err
    assert train.main(["sweep", "--config", str(DIGITS), "--sweep", str(write_sweep(tmp_path)),
                       "--set", "loss.temperature=0"]) == 2
    assert "config error: loss.temperature must be a finite number > 0" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_random_draws_follow_the_sweep_seed(tmp_path):
    from ray.tune.experiment import Experiment

    from distributed_cl.tune import param_space, search_algorithm

    def trials(seed):
        spec = load_sweep(write_sweep(tmp_path, seed=seed, num_samples=2, space={
            "optim.lr": {"loguniform": [1e-4, 1e-2]}, "loss.temperature": {"grid": [0.1, 0.2]}}), Config.load(DIGITS))
        search = search_algorithm(spec)
        search.add_configurations([Experiment("x", run=lambda config: None, config=param_space(spec),
                                              num_samples=spec.num_samples)])
        configs = []
        while (trial := search.next_trial()) is not None:
            configs.append(trial.config)
        return configs

    first = trials(0)
    assert len(first) == 4 and len({c["optim.lr"] for c in first}) == 4
    assert trials(0) == first and trials(1) != first


def test_plots_are_pngs_with_a_line_per_batch_size(tmp_path):
    spec = load_sweep(write_sweep(tmp_path), Config.load(DIGITS))
    rows = [{"params": {"loss.temperature": t, "train.global_batch_size": b}, "status": s,
             "early_stopped": s == "early_stopped", "final_knn_top1": v}
            for t, b, s, v in [(0.05, 32, "completed", 0.9), (0.2, 32, "early_stopped", 0.8),
                               (0.05, 64, "completed", 0.85), (0.2, 64, "failed", float("nan"))]]
    paths = plot_results(tmp_path, rows, spec)
    assert [p.name for p in paths] == ["knn_top1_vs_temperature.png", "heatmap.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000 for p in paths)


def test_a_continuous_series_is_one_scatter_coloured_by_its_value(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, space={"loss.temperature": {"grid": [0.05, 0.2]},
                                                   "optim.lr": {"loguniform": [1e-4, 1e-2]}}), Config.load(DIGITS))
    rows = [{"params": {"loss.temperature": t, "optim.lr": lr}, "status": s, "early_stopped": s == "early_stopped",
             "final_knn_top1": v} for t, lr, s, v in [(0.05, 3e-4, "completed", 0.9), (0.2, 2e-3, "early_stopped", 0.8),
                                                     (0.05, 5e-3, "completed", 0.85)]]
    (path,) = plot_results(tmp_path, rows, spec)  # no heatmap: the learning rates are not a grid
    assert path.name == "knn_top1_vs_temperature.png" and path.read_bytes()[:8] == PNG_MAGIC


def test_summary_and_best_use_the_metric_at_the_end_of_each_trial():
    spec = SweepSpec(metric="knn_top1", space={"train.global_batch_size": {"grid": [64, 128, 256]}})
    rows = [{"params": {"train.global_batch_size": b}, "status": "completed", "epochs": 3, "steps": 3 * 768 // b,
             "final_knn_top1": final, "best_knn_top1": best}
            for b, final, best in [(64, 0.80, 0.90), (128, 0.85, 0.85), (256, float("nan"), float("nan"))]]
    assert best_row(rows, spec)["params"] == {"train.global_batch_size": 128}
    assert best_row(rows, SweepSpec(metric="knn_top1", mode="min", space=spec.space))["final_knn_top1"] == 0.80
    lines = summary_table(rows, spec).splitlines()
    assert lines[0].split() == ["train.global_batch_size", "status", "epochs", "steps", "final_knn_top1",
                                "best_knn_top1"]
    assert lines[1].split() == ["64", "completed", "3", "36", "0.8000", "0.9000"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


# ----------------------------------------------------------------------------- real sweeps
# They share one 2-CPU Ray cluster that outlives each sweep, as on a real cluster (where a leak
# matters: a placement group that a stopped trial left behind holds its CPUs until the cluster
# goes), with token authentication on.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head (2 CPUs, dashboard on, token auth); yields the environment that joins it."""
    with token_auth_cluster(tmp_path_factory.mktemp("cluster"), node_cpus=(2,)) as env:
        yield env


def live_placement_groups(env, settle_s: float = 30) -> list[dict]:
    """The cluster's placement groups not yet removed, once Ray Train's cleaner has had `settle_s`."""
    code = ("import json, ray; ray.init(log_to_driver=False); "
            "print(json.dumps([{'id': k, 'state': g['state'], 'bundles': g['bundles']} "
            "for k, g in ray.util.placement_group_table().items()]))")
    deadline = time.time() + settle_s
    while True:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                             check=True)
        live = [g for g in json.loads(out.stdout.strip().splitlines()[-1]) if g["state"] != "REMOVED"]
        if not live or time.time() > deadline:
            return live
        time.sleep(2)


def sweep_cmd(tmp_path, sweep, name, storage=None):
    return [sys.executable, str(ROOT / "train.py"), "sweep", "--config", str(DIGITS), "--sweep", str(sweep),
            "--storage-path", storage or str(tmp_path / "sweeps"), "--name", name]


def results(tmp_path, name) -> list[dict]:
    with open(tmp_path / "sweeps" / name / "results.csv") as f:
        return list(csv.DictReader(f))


def run_sweep_process(cmd, env, timeout=480):  # a guard against a hang, not a speed test
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


# ASHA must stop something, deterministically. One trial at a time, in grid order: trial 1 scores
# its kNN against the whole bank (its 512 training images) and runs its 2 epochs; trial 2, trained
# the same (same seed), scores against a bank of 10 images, worse by construction, so at the one
# rung (epoch 1; reduction factor 3 over 2 epochs) it falls below trial 1's score there and is
# stopped. The fashion_mnist trials are valid configs whose data is missing (data.root points
# nowhere; the sweep file is checked before Ray starts, the trials' files are not): they fail as
# they load it, before any worker starts, with the error in the CSV, and the sweep goes on.
ASHA_SPACE = {"data.eval_bank_size": {"grid": [0, 10]}, "data.name": {"grid": ["digits", "fashion_mnist"]}}


def test_asha_sweep_stops_trials_early_records_a_failed_one_frees_their_resources_and_writes_best(tmp_path, cluster):
    """Its storage is a URI, as on a cluster (s3://, gs://); its trials cache gradients, 8 samples
    at a time."""
    fixed = {"train.cpus_per_worker": 0.5, "train.log_every": 5, "train.checkpoint_every": 10,
             "train.grad_cache_chunk": 8, "data.train_subset": 512,  # epochs of 8 steps
             "data.root": str(tmp_path / "no-fashion-mnist")}
    sweep = write_sweep(tmp_path, epochs=2, space=ASHA_SPACE, fixed=fixed,
                        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 3},
                        max_concurrent_trials=1)
    out = run_sweep_process(sweep_cmd(tmp_path, sweep, "asha", storage=(tmp_path / "sweeps").as_uri()), cluster)
    assert "Trial status:" in out and "data.eval_bank_size" in out  # Tune's table, our summary
    assert "Started training worker group" not in out  # trials' Ray Train lines only with --verbose
    rows = results(tmp_path, "asha")
    assert sorted((r["data.name"], r["data.eval_bank_size"]) for r in rows) == [
        ("digits", "0"), ("digits", "10"), ("fashion_mnist", "0"), ("fashion_mnist", "10")]
    failed = [r for r in rows if r["data.name"] == "fashion_mnist"]
    assert all(r["status"] == "failed" and "data.root: neither" in r["error"] for r in failed), failed
    rows = [r for r in rows if r not in failed]
    for r in rows:
        whole_bank = r["data.eval_bank_size"] == "0"
        assert r["status"] == ("completed" if whole_bank else "early_stopped"), r
        assert r["early_stopped"] == str(not whole_bank)
        assert int(r["epochs"]) == (2 if whole_bank else 1) and int(r["steps"]) > 0
        assert 0 < float(r["best_knn_top1"]) <= 1 and not r["error"]
    # 16 steps teach the digits' kNN nothing (measured, the completed trial: 0.7306 trained, 0.7239
    # untrained): the trials' figures pinned, as measured, the same run after run (of 297 test images)
    scores = {r["data.eval_bank_size"]: (float(r["final_knn_top1"]), float(r["best_knn_top1"])) for r in rows}
    assert scores["0"] == (pytest.approx(217 / 297), pytest.approx(240 / 297)), scores  # epoch 2, epoch 1
    assert scores["10"] == (pytest.approx(98 / 297), pytest.approx(98 / 297)), scores  # stopped after epoch 1
    # trials that ran their whole budget ended by themselves (ASHA leaves their last report alone):
    # their exported model is in their last checkpoint (storage a URI: not copied beside it)
    trials = tmp_path / "sweeps" / "asha" / "trials"
    assert sorted({p.relative_to(trials).parts[0] for p in trials.glob("*/*/export/towers.pt")}) == sorted(
        r["trial_id"] for r in rows if r["status"] == "completed")
    # Ray Train removed the stopped trials' placement groups (the next test's sweep on this
    # cluster would wait for ever on their CPUs otherwise)
    assert live_placement_groups(cluster) == []
    sweep_dir = tmp_path / "sweeps" / "asha"
    assert (sweep_dir / "knn_top1_vs_eval_bank_size.png").read_bytes()[:8] == PNG_MAGIC
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["data"]["eval_bank_size"] == 0 and best["train"]["epochs"] == 2
    assert best["train"]["storage_path"] == "./runs"  # the config's own paths, not made absolute
    # what `train.py --config best.yaml` loads (and trainer.run trains, as the other tests show):
    # valid, with the sweep's fixed values and the best trial's parameters
    config = Config.load(sweep_dir / "best.yaml")
    assert (config.data.eval_bank_size, config.train.epochs, config.train.grad_cache_chunk) == (0, 2, 8)


def test_killed_sweep_driver_resumes_finished_trials_kept_unfinished_from_checkpoints(tmp_path, cluster, mlflow_uri):
    """The trials report to a real MLflow server: one run each, named by its values, which the
    resumed trial continues, and the sweep's results logged once beside them."""
    sweep = write_sweep(tmp_path, epochs=1, space={"loss.temperature": {"grid": [0.1, 0.2]}},
                        scheduler={"name": "fifo"}, max_concurrent_trials=1,
                        # one worker a trial: the resume is Tune's; the other sweep has DDP trials
                        fixed={"train.cpus_per_worker": 0.5, "train.checkpoint_every": 5, "train.num_workers": 1,
                               "train.loggers": ["tensorboard", "mlflow"], "train.mlflow.tracking_uri": mlflow_uri})
    env = {**cluster, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its experiment state every second
    proc = subprocess.Popen(sweep_cmd(tmp_path, sweep, "resume"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    trials = tmp_path / "sweeps" / "resume" / "trials"

    def finished():
        return [p.parent for p in trials.glob("*/towers.pt")]

    def checkpointed_unfinished():  # the controller has registered a checkpoint of a running trial
        return [p.parent for p in trials.glob("*/checkpoint_manager_snapshot.json") if p.parent not in finished()]

    deadline = time.time() + 180
    while not (finished() and checkpointed_unfinished()):
        assert time.time() < deadline and proc.poll() is None, "no trial finished while the next one checkpointed"
        time.sleep(0.5)
    (done,), (unfinished,) = finished(), checkpointed_unfinished()
    kept = (done / "metrics.csv").read_text()
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep's driver: its trials' actors go with its job
    proc.wait()
    out = run_sweep_process(sweep_cmd(tmp_path, sweep, "resume"), env)
    assert "temperature=0.1" in out and "_run_trial_" not in out  # Tune's table names trials by their values
    rows = results(tmp_path, "resume")
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == "1" for r in rows)
    assert (done / "metrics.csv").read_text() == kept  # not trained, evaluated or reported again
    with open(unfinished / "metrics.csv") as f:
        starts = {int(r["start_step"]) for r in csv.DictReader(f)}
    assert 0 in starts and max(starts) >= 5  # its second attempt began from a checkpoint
    # one epoch (23 steps) teaches the digits' kNN nothing (measured: 0.82 and 0.83 trained, 0.84
    # untrained): the figures pinned, as uninterrupted trials score them (a resumed trial too)
    scores = {r["loss.temperature"]: float(r["final_knn_top1"]) for r in rows}
    assert scores == {"0.1": pytest.approx(244 / 297), "0.2": pytest.approx(247 / 297)}, scores

    from mlflow.tracking import MlflowClient

    from distributed_cl.trackers import SWEEP_TAG

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])  # the sweep's name
    by_name = {r.info.run_name: r for r in runs}
    assert len(runs) == 3 and set(by_name) == {"temperature=0.1", "temperature=0.2", "resume"}, by_name
    for value in ("0.1", "0.2"):
        run = by_name[f"temperature={value}"]
        assert run.info.status == "FINISHED" and run.data.tags[SWEEP_TAG] == "resume"
        assert run.data.params["loss.temperature"] == value and run.data.params["train.epochs"] == "1"
        assert run.data.metrics["knn_top1_trained"] == pytest.approx(scores[value])
    results_files = {a.path for a in client.list_artifacts(by_name["resume"].info.run_id)}
    assert results_files == {"results.csv", "best.yaml", "knn_top1_vs_temperature.png", "report.html"}, results_files
    report = (tmp_path / "sweeps" / "resume" / "report.html").read_text()  # the sweep's page: its trials and plot
    assert report.count("<td>completed</td>") == 2 and 'alt="knn_top1_vs_temperature"' in report
