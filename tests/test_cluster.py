"""Clusters: the launcher YAMLs pass Ray's own validator, and a real two-node Ray cluster on this
machine runs train.py submitted with `ray job submit`, one worker per node, token auth on."""

import contextlib
import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray_cluster import RAY_CLI, add_node, ended, node_pids, ray_cli, token_auth_cluster
from test_train_cli import DIGITS, ROOT, train_worker_pids

from distributed_cl.models import load_encoder
from distributed_cl.train_loop import STATE_FILE, WORKERS_FILE

LAUNCHER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))


def launcher_config(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def ray_validates(config: dict) -> dict:
    """What `ray up` checks before it touches a cloud: Ray's own config preparation and schema
    validation (ray.autoscaler's prepare_config and validate_config), offline."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


# ----------------------------------------------------------------------------- launcher YAMLs


def test_every_launcher_yaml_passes_rays_validator():
    assert [p.name for p in LAUNCHER_YAMLS] == ["aws.yaml", "gcp.yaml", "local.yaml"]
    for path in LAUNCHER_YAMLS:
        config = ray_validates(yaml.safe_load(path.read_text()))
        if config["provider"]["type"] != "local":  # on-prem: the machines listed, no node types to choose
            gpu = config["available_node_types"]["gpu"]
            assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"], path.name
            assert "cpu" in config["available_node_types"] and config["head_node_type"] == "head"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_installs_the_package_and_keeps_token_auth_on(path):
    config = yaml.safe_load(path.read_text())
    # `ray submit` copies only train.py: every node gets this working copy and installs it
    assert config["file_mounts"]["~/src/distributed_cl"] == "."
    assert any("pip install" in c and "$HOME/src/distributed_cl[text]" in c and "constraints.txt" in c
               for c in config["setup_commands"])
    assert (ROOT / "scripts" / "constraints.txt").exists()
    # the token goes to every node and every `ray start` demands it; the dashboard stays on 127.0.0.1
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert not any("dashboard-host" in c for c in starts)
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])  # clients too
    text = path.read_text()  # placeholders, never credentials
    for secret in ("aws_secret_access_key", "PRIVATE KEY", "AKIA", "password"):
        assert secret not in text


@pytest.mark.parametrize(
    "name,break_it,error",
    [
        ("aws.yaml", lambda c: c.update(head_node_type="gpu_head"), "head_node_type"),
        ("aws.yaml", lambda c: c.update(max_worker=3), "'max_worker' was unexpected"),
        ("gcp.yaml", lambda c: c["available_node_types"]["gpu"].update(max_workers="four"), "is not of type 'integer'"),
        ("gcp.yaml", lambda c: c["available_node_types"]["gpu"].pop("node_config"), "'node_config' is a required"),
        ("aws.yaml", lambda c: c["auth"].update(ssh_password="x"), "'ssh_password' was unexpected"),
        ("local.yaml", lambda c: c["provider"].pop("worker_ips"), "worker_ips"),
    ],
)
def test_a_broken_launcher_yaml_fails_rays_validator(name, break_it, error):
    config = launcher_config(name)
    ray_validates(config)
    break_it(config)
    with pytest.raises(Exception, match=error):
        ray_validates(config)


def test_a_copy_of_train_py_finds_the_configs_of_the_installed_repository(tmp_path):
    """`ray submit` runs a copy of train.py in the head's home directory, away from experiments/."""
    shutil.copy(ROOT / "train.py", tmp_path / "train.py")
    out = subprocess.run([sys.executable, "train.py", "--config", "experiments/image_simclr.yaml",
                          "--set", "train.max_steps=-1"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "config error: train.max_steps" in out.stderr, out.stderr  # found, then checked
    out = subprocess.run([sys.executable, "train.py", "--config", "experiments/missing.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "experiments/missing.yaml" in out.stderr


# ----------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and one more node, 3 CPUs each: Ray Train's 2 workers of 2 CPUs (STREAMED) must take
    one each, and a stream's reading and decoding tasks the CPU beside them."""
    with token_auth_cluster(tmp_path_factory.mktemp("cluster"), node_cpus=(3, 3)) as env:
        yield env


def cluster_node_ids(env) -> set[str]:
    code = "import json, ray; ray.init(log_to_driver=False); print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_train_py_on_the_head_without_ray_address_joins_the_cluster(two_nodes):
    """`ray submit` runs train.py on the head over ssh, where no RAY_ADDRESS is set: the driver
    must join the head that `ray start` recorded, not start a Ray of its own."""
    env = {k: v for k, v in two_nodes.items() if k != "RAY_ADDRESS"}
    code = ("import json, ray; from distributed_cl.trainer import connect_ray; connect_ray(log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    nodes = cluster_node_ids(two_nodes)
    assert set(json.loads(out.stdout.strip().splitlines()[-1])) == nodes and len(nodes) == 2


def test_the_cluster_refuses_clients_without_its_token(two_nodes):
    request = urllib.request.Request(f"{two_nodes['DASHBOARD_URL']}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code in (401, 403)
    token = Path(two_nodes["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
    wrong = {**two_nodes, "RAY_AUTH_TOKEN": "0" * 64}
    wrong.pop("RAY_AUTH_TOKEN_PATH")
    assert ray_cli(wrong, "job", "list", "--address", two_nodes["DASHBOARD_URL"], check=False).returncode != 0


# The elastic job's data: images streamed through Ray Data (11 global batches an epoch, so the
# node goes mid-epoch), as the fixed 2-worker run of the same command logs them: its loss at step 10,
# where the elastic run below loses a node (measured: the job's train.py command with
# train.num_workers=2, the same on every run).
STREAMED = ["--set", "dataset.format=imagefolder", "--set", "dataset.cache=false", "--set", "dataset.eval_fraction=0.1",
            "--set", "dataset.decode_cpus=0.5", "--set", "train.cpus_per_worker=2", "--set", "train.log_every=5"]
FIXED_STEP_10_LOSS = 3.8474


def batches_logged(directory: Path) -> dict[str, list[dict]]:
    """train.batch_log's lines, by rank file."""
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(directory.glob("*.jsonl"))}


def phases(lines: list[dict]) -> list[list[dict]]:
    """A rank's batch-log lines cut where its worker group restarted: a group's batches follow one
    another (the next in the epoch, or a new epoch's first), and its rows a batch do not change."""
    out = []
    for line in lines:
        last = out[-1][-1] if out else None
        if last is None or len(line["rows"]) != len(last["rows"]) or (line["epoch"], line["batch"]) not in (
                (last["epoch"], last["batch"] + 1), (last["epoch"] + 1, 0)):
            out.append([])
        out[-1].append(line)
    return out


def global_batches(*rank_lines: list[dict]) -> dict[tuple[int, int], list[str]]:
    """{(epoch, batch): the global batch's rows, rank 0's share first} of one worker group."""
    batches = {}
    for lines in rank_lines:
        for line in lines:
            batches.setdefault((line["epoch"], line["batch"]), []).extend(line["rows"])
    return batches


def test_an_elastic_streamed_job_loses_a_node_then_grows_when_one_joins_at_the_same_rows(tmp_path, two_nodes):
    """`ray job submit` of train.py with train.num_workers: [1, 2] on a head and one more node, a
    worker on each, images streamed through Ray Data, into shared storage. Two steps after the
    step-10 checkpoint the second node goes (every process of it killed): Ray Train goes on from
    that checkpoint with the one worker the head holds, each step still the global batch of 64,
    the stream's two parts now both read by it. Then a new node joins: at its next resize check
    Ray Train restarts from the latest checkpoint on two workers again. The steps run again after
    each change take the same rows as before it, the epoch in progress takes no row twice, and
    the run exports into the shared run directory. (The last test of the module.)"""
    from own_data import write_imagefolder

    shared = tmp_path / "shared"  # stands in for NFS or s3://: every node of this cluster sees it
    summary, run, log = tmp_path / "summary.json", shared / "two-nodes", shared / "batches"
    images = write_imagefolder(shared / "images", 800)
    nodes, removed = cluster_node_ids(two_nodes), node_pids(1)  # asked before: the kill must follow step 12 closely
    for _ in range(3):  # the head's job agent registers some seconds after `ray start`; Ray says to retry
        submit = subprocess.Popen(
            [RAY_CLI, "job", "submit", "--address", two_nodes["DASHBOARD_URL"], "--working-dir", str(ROOT), "--",
             "python", "train.py", "--config", str(DIGITS.relative_to(ROOT)), "--storage-path", str(shared),
             "--name", "two-nodes", "--output-json", str(summary), "--set", "train.num_workers=[1, 2]",
             "--set", "train.elastic_resize_interval_s=1", "--set", "train.verbose=true", "--set", f"dataset.path={images}",
             "--set", f"train.batch_log={log}", *STREAMED],
            env=two_nodes, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if wait_for(lambda: (run / "checkpoint_manager_snapshot.json").exists()
                    and len(batches_logged(log).get("rank0", [])) >= 12, submit):  # step 12 begun
            break
        assert submit.poll() is not None, "the job did not reach step 12 in 300 s"
        logs = submit.communicate()[0]
        assert "No available agent to submit job" in logs, logs[-6000:]
        time.sleep(10)
    for pid in removed:
        os.kill(pid, signal.SIGKILL)
    first = json.loads((min(p for p in run.glob("checkpoint_*") if p.is_dir()) / WORKERS_FILE).read_text())
    # the one worker's group has begun (a batch of 64 rows): a node joins. The worker is paused
    # meanwhile (SIGSTOP; a paused worker counts as running), so that the few steps left cannot
    # end the run before Ray Train sees the node: its resize check runs every second here, but
    # the cluster's nodes are looked up every 20 s (Ray's autoscaling coordinator). The resize
    # stops the paused group.
    assert wait_for(lambda: any(len(line["rows"]) == 64 for line in batches_logged(log)["rank0"]), submit)
    (alone,) = train_worker_pids(f"RAY_AUTH_TOKEN_PATH={two_nodes['RAY_AUTH_TOKEN_PATH']}")
    os.kill(alone, signal.SIGSTOP)
    try:
        add_node(two_nodes, 2, 3)
        assert wait_for(lambda: ended(alone), submit, timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(alone, signal.SIGCONT)
    logs = submit.communicate(timeout=480)[0]
    assert removed and submit.returncode == 0 and "succeeded" in logs, logs[-6000:]
    assert [w["rank"] for w in first] == [0, 1]
    assert {w["node_id"] for w in first} == nodes and len(nodes) == 2  # one worker on each node before the loss
    assert "[distributed_cl] workers: rank 0 on" in logs  # the placement line, through the job's logs
    assert "on 1 workers (the checkpoint's had 2): each takes 64 rows of the same global batch of 64" in logs
    # one machine's /tmp is shared by its two nodes here; on a real cluster it would not be
    assert f"warning: train.storage_path {shared} is on a" in logs

    # the three worker groups' global batches: two workers (32 rows each, part 0's then part
    # 1's), one (64 rows, both parts), two again. Steps after the checkpoint a group resumed
    # from ran in both groups around the change, on the same rows.
    logged = {rank: phases(lines) for rank, lines in batches_logged(log).items()}
    assert [len(p[0]["rows"]) for p in logged["rank0"]] == [32, 64, 32], logs[-15000:]
    assert len(logged["rank1"]) == 2
    groups = [global_batches(logged["rank0"][0], logged["rank1"][0]), global_batches(logged["rank0"][1]),
              global_batches(logged["rank0"][2], logged["rank1"][1])]
    for before, after in zip(groups, groups[1:]):
        again = sorted(set(before) & set(after))
        assert again and all(before[k] == after[k] for k in again), again
    epoch_0 = [row for (epoch, _), rows in sorted((groups[0] | groups[1] | groups[2]).items()) if epoch == 0
               for row in rows]
    assert len(epoch_0) == 11 * 64 == len(set(epoch_0))  # the epoch's rows once each, across the changes

    result = json.loads(summary.read_text())  # the driver ran on the head, in the uploaded working dir
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.is_relative_to(shared)
    finished = json.loads((checkpoint / WORKERS_FILE).read_text())
    assert len(finished) == 2 and cluster_node_ids(two_nodes) == {w["node_id"] for w in finished}  # head + the new node
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    assert state["progress"]["step"] == yaml.safe_load(DIGITS.read_text())["train"]["max_steps"] == 30
    start = result["metrics"]["start_step"]  # where the last group began: the step after its checkpoint
    assert start in (10, 20) and min(set(groups[1]) & set(groups[2])) == divmod(start, 11), start

    encoder = load_encoder(result["encoder"])  # exported beside metrics.csv in the shared run dir
    assert Path(result["encoder"]).parent == run
    features = encoder(torch.rand(5, 3, 12, 12))
    assert features.shape[0] == 5 and torch.isfinite(features).all()
    with open(run / "metrics.csv") as f:
        losses = {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f) if row["loss"]}
    assert set(losses) == {5, 10, 15, 20, 25, 30}
    assert losses[10] == pytest.approx(FIXED_STEP_10_LOSS, abs=1e-4), losses  # before the loss: the fixed run's


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll `condition` until it holds (True), or `process` ends or the time is up (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.2)
    return False
