"""Real Ray clusters for the tests: a head started with `ray start --head`, more nodes with
`ray start --address`, token authentication on, as on a cluster (not ray.init's private one)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

RAY_CLI = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(env: dict, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([RAY_CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=check)


@contextmanager
def token_auth_cluster(tmp_dir: Path, node_cpus: tuple[float, ...] = (2,)):
    """A head and len(node_cpus) - 1 more nodes on this machine, node i with node_cpus[i] CPUs.
    Yields the environment that joins it: RAY_ADDRESS, the token, and DASHBOARD_URL (the Jobs
    API, where `ray job submit` goes)."""
    token = tmp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port, dashboard_port = free_port(), free_port()
    try:
        ray_cli(env, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                f"--dashboard-port={dashboard_port}", f"--num-cpus={node_cpus[0]}", *SMALL_NODE)
        joined = env | {"RAY_ADDRESS": f"127.0.0.1:{port}", "DASHBOARD_URL": f"http://127.0.0.1:{dashboard_port}"}
        for i, cpus in enumerate(node_cpus[1:], 1):
            add_node(joined, i, cpus)
        yield joined
    finally:
        stop_cluster(env)


NODE_MARK = "DCL_TEST_NODE"
SMALL_NODE = ["--num-gpus=0", "--object-store-memory=200000000", "--disable-usage-stats"]


def add_node(cluster_env: dict, i: int, cpus: float) -> None:
    """Node i of token_auth_cluster's cluster: its own raylet, object store and resources. Its
    processes (raylet, workers) carry DCL_TEST_NODE=i: `node_pids` finds them, to remove the node."""
    ray_cli({k: v for k, v in cluster_env.items() if k != "RAY_ADDRESS"} | {NODE_MARK: str(i)}, "start",
            f"--address={cluster_env['RAY_ADDRESS']}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
            f"--dashboard-agent-listen-port={free_port()}", *SMALL_NODE)


def node_pids(i: int) -> list[int]:
    """The processes of a token_auth_cluster's node i (1 for the first after the head)."""
    return pids_with_env(f"{NODE_MARK}={i}")


def pids_with_env(mark: str) -> list[int]:
    """The processes other than this one whose environment holds `mark` ("NAME=value")."""
    entry = mark.encode()
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if pid != os.getpid() and entry in environ(pid)]


def stop_cluster(env: dict, grace_s: float = 2) -> None:
    """What `ray stop --force` does, for this cluster only (its processes carry its token path in
    their environment): `ray stop` would also kill every other Ray on the machine, such as a
    parallel test's. Some of them ignore SIGTERM for half a minute: SIGKILL after `grace_s`."""
    pids = pids_with_env(f"RAY_AUTH_TOKEN_PATH={env['RAY_AUTH_TOKEN_PATH']}")
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while (pids := [pid for pid in pids if not ended(pid)]) and time.time() < deadline:
            time.sleep(0.2)
    from ray._common.utils import reset_ray_address  # the head `ray start` recorded: gone now

    reset_ray_address()


def environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def ended(pid: int) -> bool:
    """Whether process `pid` has exited (gone, or a zombie its parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
