"""train.py end to end: 2 Ray Train workers in local mode that survive a killed worker, an interrupted driver."""

import atexit
import contextlib
import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from model_cards import check_model_card
from ray_cluster import pids_with_env

from distributed_cl.config import Config
from distributed_cl.models import load_encoder
from distributed_cl.tasks import load_towers
from distributed_cl.tasks.image import ImageTask

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "tests" / "configs" / "digits.yaml"


def train_cmd(tmp_path, name, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(DIGITS), "--storage-path", str(tmp_path / "runs"),
            "--name", name, "--output-json", str(tmp_path / f"{name}.json"), *extra]


def run_env():
    """The environment of a train.py run: a Ray of its own. train.py joins any running local Ray
    it finds (as it should under `ray submit`), and Ray finds them through the files in its temp
    directory, so a fresh temp directory keeps the run off a Ray another test has up. The
    directory is short: Ray's socket paths must fit in 107 bytes."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="dcl-", dir="/tmp")
    atexit.register(shutil.rmtree, env["RAY_TMPDIR"], ignore_errors=True)  # its Ray's sessions and logs
    return env


def start(cmd, mark: str = ""):
    # own session: killing the group takes the driver's local Ray with it
    return subprocess.Popen(cmd, cwd=ROOT, env={**run_env(), RUN_MARK: mark}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_registered_checkpoint(proc, timeout=120) -> str:
    """Until the controller has registered a checkpoint (a file on disk is not enough: Ray
    commits it only once every worker has reported); the console output up to then."""
    deadline, seen = time.time() + timeout, []
    for line in proc.stdout:
        seen.append(line)
        if "checkpoint saved" in line:
            return "".join(seen)
        assert time.time() < deadline, "".join(seen[-50:])
    raise AssertionError("training ended before a checkpoint:\n" + "".join(seen[-50:]))


RUN_MARK = "DISTRIBUTED_CL_TEST_RUN"  # in a test run's environment, so its Ray processes can be told apart


def train_worker_pids(env_entry: str) -> list[int]:
    """The Ray Train workers whose environment holds `env_entry` ("NAME=value"): a local Ray
    passes its driver's environment on, so this tells one run's workers from other runs'."""
    return [pid for pid in pids_with_env(env_entry) if b"RayTrainWorker" in cmdline(pid)]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def kill_a_worker(proc, mark: str) -> str:
    """SIGKILL one of the run's Ray Train workers once a checkpoint is registered; the console
    output up to then."""
    before = wait_for_registered_checkpoint(proc)
    pids = train_worker_pids(f"{RUN_MARK}={mark}")
    assert pids, "no Ray Train worker process found"
    os.kill(pids[-1], signal.SIGKILL)
    return before


def kill_the_run(proc, mark: str) -> None:
    """SIGKILL the driver and every process of its local Ray at once. Killing the driver's process
    group is not enough: Ray starts its actors (the Train controller, the workers) in groups of
    their own, and they would train on for a second or two until they notice that the raylet is
    gone, long enough to reach the last step's checkpoint."""
    for pid in pids_with_env(f"{RUN_MARK}={mark}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.mark.xdist_group("ray")  # a Ray of its own, in train.py: with the others (conftest.py)
def test_cli_survives_a_killed_worker_and_an_interrupted_driver_and_exports_the_encoder(tmp_path, mlflow_uri):
    """One run, three attempts: a worker is killed after the step-10 checkpoint and Ray Train
    restarts the group from it; once that attempt has registered a checkpoint of its own, the
    driver and its local Ray are killed at once; train.py run again with the same name resumes
    and finishes. The queue and its momentum encoder come back from each checkpoint with the
    weights. The run reports to the three trackers, a real MLflow server among them, and each
    holds one run that the resumes continued."""
    queue = ["--set", "loss.queue_size=128", "--set", "train.momentum=0.9"]
    trackers = ["--set", "train.loggers=[tensorboard, mlflow, wandb]", "--set", f"train.mlflow.tracking_uri={mlflow_uri}",
                "--set", "train.mlflow.experiment=cli-test", "--set", "train.wandb.mode=offline"]
    cmd = train_cmd(tmp_path, "cli", "--max-steps", "60", *queue, *trackers)
    mark = secrets.token_hex(8)
    proc = start(cmd, mark)
    out = kill_a_worker(proc, mark)
    out += wait_for_registered_checkpoint(proc)  # the restarted group's first
    kill_the_run(proc, mark)
    assert not (tmp_path / "cli.json").exists()  # killed before it finished
    last = finish(start([*cmd, "--verbose"]))  # resumed as before, with Ray's own lines
    summary = json.loads((tmp_path / "cli.json").read_text())
    m = summary["metrics"]
    assert m["step"] == 60, out + last
    run_dir = Path(summary["run_dir"])
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    starts = sorted({int(r["start_step"]) for r in rows})
    # from zero, from the checkpoint before the kill, from the restarted group's checkpoint
    assert len(starts) == 3 and starts[0] == 0 and 10 <= starts[1] < starts[2] == m["start_step"] < 60, starts
    # 60 steps of SimCLR on 8x8 digits teach a random CNN nothing kNN can see (the trained figure
    # is below the untrained one): pinned instead, at an uninterrupted run's figures (the same run
    # resumed from any checkpoint reproduces them exactly; measured: trained 0.7778 = 231/297 test
    # images, untrained 0.8418, raw pixels 0.9697, last logged loss 5.4977)
    assert m["knn_top1_trained"] == pytest.approx(231 / 297, abs=1e-4), m
    assert (m["knn_top1_untrained"], m["knn_top1_raw_pixels"]) == (pytest.approx(0.8418, abs=1e-4),
                                                                    pytest.approx(0.9697, abs=1e-4)), m
    assert 100 < m["peak_memory_mib"] < 8000
    assert "[distributed_cl] step 10/60" in out
    quiet = ("Reporting training result", "Checkpoint successfully created", "Started a local Ray instance",
             "Token authentication is enabled", "Started training worker group", "Setting up process group")
    assert [notice for notice in quiet if notice in out] == []  # by default: the project's lines only
    assert "Started training worker group" in last and "Started a local Ray instance" in last  # --verbose
    table = last[last.index("held-out image") :].splitlines()
    assert table[1].split() == ["knn_top1"] + [f"{m[f'knn_top1_{w}']:.4f}" for w in ("trained", "untrained", "raw_pixels")]
    assert Path(summary["checkpoint"]).is_dir()
    assert rows and list(rows[0])[:4] == ["time", "step", "epoch", "loss"] and len(rows) >= 60 // 10
    assert float([r for r in rows if r["loss"]][-1]["loss"]) == pytest.approx(5.4977, abs=1e-3)  # step 60's
    check_trackers(run_dir, rows, m, mlflow_uri)
    # the model card beside the exports: the run's figures, and a snippet that loads encoder.pt as written
    made = check_model_card(run_dir, "pytorch", None, {"knn_top1": tuple(m[f"knn_top1_{w}"] for w in (
        "trained", "untrained", "raw_pixels"))})
    assert made["features"].shape == (2, 8 * 4 * 2 * 2)
    # the run report: the final table, a curve per figure, the held-out view
    report = (run_dir / "report.html").read_text()
    assert f"<td>knn_top1</td><td>{m['knn_top1_trained']:.4f}</td><td>{m['knn_top1_untrained']:.4f}</td>" in report
    assert all(f'alt="{name}"' in report for name in ("loss", "lr", "knn_top1")) and "Retrieval examples" in report
    encoder = load_encoder(summary["encoder"])  # no Ray needed
    assert encoder(torch.rand(3, 1, 8, 8)).shape == (3, 8 * 4 * 2 * 2)
    towers = load_towers(run_dir / "towers.pt")  # the generic export: the encoder and its head
    torch.testing.assert_close(towers.encoder(torch.ones(2, 1, 8, 8)), encoder(torch.ones(2, 1, 8, 8)))
    # the reported figure is the exported model's: both workers evaluated rank 0's weights and buffers
    assert ImageTask(Config.load(DIGITS)).evaluate(towers)["knn_top1"] == m["knn_top1_trained"]


def check_trackers(run_dir: Path, rows: list[dict], m: dict, mlflow_uri: str) -> None:
    """What each tracker holds of the run, against metrics.csv (every report) and the final
    metrics: one tracker run for the three attempts, its params, its loss curve, the final
    table and the exports."""
    from mlflow.tracking import MlflowClient
    from trackers_read import tensorboard_scalars, wandb_offline_runs

    logged = {}  # step -> loss, as metrics.csv has it (a step re-run after a resume: the later value)
    for r in rows:
        if r["loss"]:
            logged[int(r["step"])] = float(r["loss"])
    last_start = m["start_step"]  # the last attempt's reports reached every tracker; a killed one's, all but the last
    final_steps = {int(r["step"]) for r in rows if r["loss"] and int(r["start_step"]) == last_start}

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "cli"
    assert (run.data.params["loss.queue_size"], run.data.params["train.max_steps"]) == ("128", "60")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {h.step for h in history} >= final_steps and {h.step for h in history} <= set(logged)
    assert all(h.value == pytest.approx(logged[h.step], abs=1e-6) for h in history if h.step > last_start)
    assert run.data.metrics["knn_top1_trained"] == pytest.approx(m["knn_top1_trained"])
    assert run.data.metrics["knn_top1_untrained"] == pytest.approx(m["knn_top1_untrained"])
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/encoder.pt", "export/towers.pt"} <= exported, exported
    assert client.list_artifacts(run.info.run_id, "checkpoint")

    # two controllers opened the run: the killed one (whose records W&B may not have written before
    # the kill), and the resumed one's, with the same id
    runs = wandb_offline_runs(run_dir)
    assert len(runs) == 2 and {r["id"] for r in runs} - {None} == {runs[-1]["id"]} and runs[-1]["name"] == "cli", runs
    assert runs[-1]["config"]["loss.queue_size"] == 128 and runs[-1]["config"]["train.momentum"] == 0.9
    curve = runs[-1]["history"]["loss"]
    assert set(curve) == final_steps and all(v == pytest.approx(logged[s], abs=1e-6) for s, v in curve.items())
    assert runs[-1]["summary"]["knn_top1_trained"] == pytest.approx(m["knn_top1_trained"])
    (model,) = runs[-1]["artifacts"]
    assert model["type"] == "model" and "export/towers.pt" in model["refs"]

    scalars, texts = tensorboard_scalars(run_dir / "tensorboard")
    assert final_steps <= set(scalars["loss"]) <= set(logged)
    assert all(v == pytest.approx(logged[s], rel=1e-6) for s, v in scalars["loss"].items() if s > last_start)
    assert scalars["final/knn_top1_trained"] == {60: pytest.approx(m["knn_top1_trained"], rel=1e-6)}
    assert "| loss.queue_size | 128 |" in next(iter(texts.values()))
