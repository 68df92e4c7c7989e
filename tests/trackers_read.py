"""The trackers' own files and servers, read back as their users' tools would: a real MLflow
tracking server, W&B's offline run files (its transaction log, parsed with W&B's own protobuf
classes), TensorBoard's event files (TFRecords of tensorboardX's Event protos)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from ray_cluster import free_port

MLFLOW_CLI = str(Path(sys.executable).parent / "mlflow")


@contextlib.contextmanager
def mlflow_server(root: Path):
    """`mlflow server` with a SQLite backend and a local artifact root, on a free loopback port;
    yields its URI."""
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen([MLFLOW_CLI, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{uri}/health", timeout=5).read() == b"OK":
                    break
            assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def wandb_records(path: Path):
    """The records of a W&B run file (run-<id>.wandb): a 7-byte header, then LevelDB-style log
    blocks of 32 KiB whose records (checksum, length, type) hold pieces of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < 7:  # its header not yet written
        return
    assert data[:4] == b":W&B", path
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if left >= 7 else (0, 0)
        if kind == 0:  # the rest of the block is padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            return
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def finished_wandb_records(path: Path, timeout: float = 60.0) -> list:
    """A run file's records once they end with the run's exit record: `run.finish()` can return
    before W&B's service has flushed the file to disk (seen on a loaded machine)."""
    deadline = time.time() + timeout
    while not ((records := list(wandb_records(path))) and records[-1].WhichOneof("record_type") == "exit"):
        assert time.time() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.2)
    return records


def item_key(item) -> str:
    """A history or summary item's key: `key`, or its `nested_key` path joined by dots."""
    return item.key or ".".join(item.nested_key)


def wandb_offline_runs(directory: Path) -> list[dict]:
    """Each offline run under `directory`/wandb, in the order they ran: its id, name, group,
    config, history ({key: {step: value}}), summary and logged artifacts. The last one must have
    finished (its file is awaited until it has); earlier ones are read as they are."""
    runs = []
    files = sorted(Path(directory, "wandb").glob("offline-run-*/run-*.wandb"))
    for run_file in files:
        run = {"id": None, "config": {}, "history": defaultdict(dict), "summary": {}, "artifacts": []}
        # the last run has just finished; earlier ones may have been killed (no exit record)
        for record in finished_wandb_records(run_file) if run_file == files[-1] else wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run |= {"id": record.run.run_id, "name": record.run.display_name, "group": record.run.run_group}
                run["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update if i.key != "_wandb"}
            elif kind == "history":
                row = {item_key(i): json.loads(i.value_json) for i in record.history.item}
                for key, value in row.items():
                    run["history"][key][int(row["_step"])] = value
            elif kind == "summary":
                run["summary"] |= {item_key(i): json.loads(i.value_json) for i in record.summary.update}
            elif kind == "artifact":
                run["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type,
                                         "refs": {m.path: m.ref for m in record.artifact.manifest.contents}})
        runs.append(run)
    return runs


def tensorboard_scalars(directory: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """Every scalar ({tag: {step: value}}, the last value of a step) and text of the event files
    under `directory`: TFRecords (length, its CRC, an Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars, texts = defaultdict(dict), {}
    for events in sorted(Path(directory).glob("events.out.tfevents.*")):
        data, pos = events.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag][event.step] = value.simple_value
                elif value.HasField("tensor") and value.tensor.string_val:
                    texts[value.tag] = value.tensor.string_val[0].decode()
    return scalars, texts
