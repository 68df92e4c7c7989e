"""Ray Tune sweeps: the sweep YAML checked before Ray starts, real ASHA sweeps on digits with
2 workers per trial, a failing trial recorded, best.yaml training, and a killed driver resuming."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from test_train_cli import ROOT, run_env

import train
from distributed_cl.config import Config
from distributed_cl.tune import SweepError, load_sweep, plot_results, with_fixed

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
        ({"mode": "maximum"}, "mode must be max or min"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"num_samples": "two"}, "num_samples must be an integer >= 1"),
        ({"scheduler": {"name": "pbt"}}, "scheduler.name must be one of asha, fifo"),
        ({"scheduler": {"name": "asha", "grace": 1}}, "unknown sweep key scheduler.grace"),
        ({"scheduler": {"name": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor must be an integer >= 2"),
        ({"space": {"loss.temprature": {"grid": [0.1]}}}, "space: loss.temprature is not a config field"),
        ({"space": {"loss": {"grid": [0.1]}}}, "space: loss is a config section"),
        ({"space": {"loss.temperature": {"grid": []}}}, r"space.loss.temperature.grid must be a non-empty list"),
        ({"space": {"loss.temperature": {"range": [0.1, 1]}}}, r"space.loss.temperature must be one of \{grid"),
        ({"space": {"loss.temperature": {"loguniform": [0, 1]}}}, r"loguniform needs 0 < lo < hi"),
        ({"space": {"loss.temperature": {"uniform": [0.5, 0.1]}}}, r"uniform needs lo < hi"),
        ({"space": {"train.global_batch_size": {"grid": [64, "big"]}}}, "space.train.global_batch_size must be int"),
        ({"space": {"train.name": {"grid": ["a"]}}}, "the sweep sets train.name itself"),
        ({"space": {}}, "space must map config fields"),
        ({"fixed": {"train.cpus_per_workers": 0.5}}, "train.cpus_per_workers is not a config field"),
        ({"budget": 3}, "unknown sweep key budget"),
    ],
)
def test_bad_sweep_yaml_names_the_key(tmp_path, keys, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(write_sweep(tmp_path, **keys), Config.load(DIGITS))


def test_bad_sweep_exits_2_before_ray_starts(tmp_path, capsys):
    assert train.main(["sweep", "--config", str(DIGITS), "--sweep", str(write_sweep(tmp_path, mode="best"))]) == 2
    assert "sweep error: mode must be max or min" in capsys.readouterr().err
    assert train.main(["sweep", "--config", str(DIGITS), "--sweep", str(write_sweep(tmp_path)),
                       "--set", "loss.temperature=0"]) == 2
    assert "config error: loss.temperature must be > 0" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_plots_are_pngs_with_a_line_per_batch_size(tmp_path):
    spec = load_sweep(write_sweep(tmp_path), Config.load(DIGITS))
    rows = [{"params": {"loss.temperature": t, "train.global_batch_size": b}, "status": s, "best_knn_top1": v}
            for t, b, s, v in [(0.05, 32, "completed", 0.9), (0.2, 32, "early_stopped", 0.8),
                               (0.05, 64, "completed", 0.85), (0.2, 64, "failed", float("nan"))]]
    paths = plot_results(tmp_path, rows, spec)
    assert [p.name for p in paths] == ["knn_top1_vs_temperature.png", "heatmap.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000 for p in paths)


# ----------------------------------------------------------------------------- real sweeps

# ASHA must stop something, deterministically: trials 3 and 4 score their kNN against a bank of
# 10 images (worse than the whole bank, by construction), and with 2 trials at a time they reach
# epoch 1 only after trial 1 or 2 has finished, so the cutoff is already a whole-bank score.
ASHA_SPACE = {"data.eval_bank_size": {"grid": [0, 0, 10, 10]}}


def sweep_cmd(tmp_path, sweep, name):
    return [sys.executable, str(ROOT / "train.py"), "sweep", "--config", str(DIGITS), "--sweep", str(sweep),
            "--storage-path", str(tmp_path / "sweeps"), "--name", name]


def results(tmp_path, name) -> list[dict]:
    with open(tmp_path / "sweeps" / name / "results.csv") as f:
        return list(csv.DictReader(f))


def run_sweep_process(cmd, timeout=240):
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


def test_asha_sweep_stops_trials_early_and_its_best_config_trains(tmp_path):
    run_sweep_process(sweep_cmd(tmp_path, write_sweep(tmp_path, space=ASHA_SPACE), "asha"))
    rows = results(tmp_path, "asha")
    assert len(rows) == 4
    assert sorted(r["data.eval_bank_size"] for r in rows) == ["0", "0", "10", "10"]
    for r in rows:
        whole_bank = r["data.eval_bank_size"] == "0"
        assert r["status"] == ("completed" if whole_bank else "early_stopped"), r
        assert r["early_stopped"] == str(not whole_bank)
        assert int(r["epochs"]) == (3 if whole_bank else 1) and int(r["steps"]) > 0
        assert 0 < float(r["best_knn_top1"]) <= 1 and not r["error"]
    sweep_dir = tmp_path / "sweeps" / "asha"
    plot = sweep_dir / "knn_top1_vs_eval_bank_size.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["data"]["eval_bank_size"] == 0 and best["train"]["epochs"] == 3
    out = tmp_path / "best.json"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(sweep_dir / "best.yaml"),
                    "--storage-path", str(tmp_path / "runs"), "--output-json", str(out)],
                   cwd=ROOT, env=run_env(), check=True, capture_output=True, timeout=240)
    assert 0 < json_metrics(out)["knn_top1_trained"] <= 1


def json_metrics(path):
    import json

    return json.loads(Path(path).read_text())["metrics"]


def test_a_failing_trial_is_recorded_and_the_next_sweep_does_not_hang(tmp_path):
    """Two sweeps back to back: the second must not wait on resources the first left behind.
    Its batch of 63 does not split over 2 workers: that trial fails, with its error in the CSV."""
    space = {"train.global_batch_size": {"grid": [64, 63]}}
    for name in ("first", "second"):
        run_sweep_process(sweep_cmd(tmp_path, write_sweep(tmp_path, f"{name}.yaml", epochs=1, space=space,
                                                          scheduler={"name": "fifo"}), name))
        rows = {r["train.global_batch_size"]: r for r in results(tmp_path, name)}
        assert rows["64"]["status"] == "completed" and rows["64"]["epochs"] == "1"
        assert rows["63"]["status"] == "failed" and "not divisible by train.num_workers=2" in rows["63"]["error"]


def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(tmp_path):
    sweep = write_sweep(tmp_path, space={"loss.temperature": {"grid": [0.1, 0.2, 0.3]}}, scheduler={"name": "fifo"},
                        max_concurrent_trials=1)
    proc = subprocess.Popen(sweep_cmd(tmp_path, sweep, "resume"), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    trials = tmp_path / "sweeps" / "resume" / "trials"
    deadline = time.time() + 180
    while not list(trials.glob("*/towers.pt")):  # a trial has finished and exported
        assert time.time() < deadline and proc.poll() is None, "no trial finished"
        time.sleep(1)
    time.sleep(12)  # Tune saves its experiment state every few seconds
    finished = {p.parent.name: (p.parent / "metrics.csv").read_text() for p in trials.glob("*/towers.pt")}
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray
    proc.wait()
    run_sweep_process(sweep_cmd(tmp_path, sweep, "resume"))
    rows = results(tmp_path, "resume")
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    for trial_id, metrics in finished.items():  # not trained, evaluated or reported again
        assert (trials / trial_id / "metrics.csv").read_text() == metrics
