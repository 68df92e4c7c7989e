"""Embedding at scale: a run's towers (or a config's untrained ones) over any data, in Ray Data.

Decoding runs in Ray Data's CPU tasks, as for training; the towers run in a pool of replicas
(`map_batches` over an actor pool, one replica per `--num-workers`, each on a GPU with
`--use-gpu`), anywhere in the cluster. The driver reads the embeddings back in the input's order
and only writes or searches them: `train.py embed` writes parquet shards, `evaluate` and `mine`
search them exactly in chunks (retrieval.py) as they arrive, so no corpus-sized matrix of scores
is ever made.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from distributed_cl.config import Config, ConfigError
from distributed_cl.data.formats import Columns, DatasetOptions, decoded_dataset
from distributed_cl.tasks import TASKS, TOWERS_FILE, Task, load_towers

SIDES = ("a", "b")


@dataclass(frozen=True)
class TowersSource:
    """Which towers embed: a run's trained ones (`run`: its directory, or its towers.pt), else the
    untrained towers of `config` (a `Config.to_dict()`), built as training builds them (same seed)."""

    run: str | None = None
    config: dict | None = None

    def __post_init__(self) -> None:
        if (self.run is None) == (self.config is None):
            raise ValueError("TowersSource takes a run or a config")
        if self.run is not None and not os.path.isfile(self.towers_file):
            raise ConfigError(f"--run: {self.towers_file} does not exist (a finished run's directory holds it)")

    @property
    def towers_file(self) -> str:
        return self.run if self.run.endswith(".pt") else os.path.join(self.run, TOWERS_FILE)

    def task(self) -> type[Task]:
        if self.config is not None:
            return TASKS[self.config["task"]]
        return TASKS[torch.load(self.towers_file, map_location="cpu", weights_only=True)["task"]]

    def load(self, device: torch.device) -> tuple[type[Task], torch.nn.Module, Any]:
        """(the task, its towers in eval mode on `device`, their text tokenizer or None)."""
        if self.run is not None:
            towers = load_towers(self.towers_file, map_location=device)
            return TASKS[towers.task_name], towers, getattr(towers, "tokenize", None)
        config = Config.from_dict(self.config)
        task = TASKS[config.task]
        torch.manual_seed(config.train.seed)  # the towers `finish` compares against, bit for bit
        return task, task.build_towers(config).to(device).eval(), task.tokenizer(config)

    def image_size(self, dataset: DatasetOptions | None = None) -> int:
        """The images' side length: the data's own setting, else what the towers trained on."""
        if dataset is not None:
            return dataset.image_size
        saved = self.config if self.config is not None else \
            torch.load(self.towers_file, map_location="cpu", weights_only=True)["config"]
        if saved.get("dataset"):
            return saved["dataset"]["image_size"]
        return (saved.get("image_text") or {}).get("image_size", 64)


class SideEncoder:
    """One replica of the towers, as Ray Data's actor pool holds it: decoded rows {"a": values,
    "error", ...} in, {"id", "embedding", "error"} out (a zero embedding where the row is bad)."""

    def __init__(self, source: TowersSource, side: str, use_gpu: bool, threads: int = 1) -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")
        torch.set_num_threads(max(1, threads))
        self.task, self.towers, self.tokenize = source.load(self.device)
        self.side = side
        self.text_chunk = 128 if use_gpu else 32  # a GPU wants larger calls; the CPU figure is measured

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.flatnonzero(batch["error"] == "")
        values = batch["a"][good]
        z = self.encode(values) if len(good) else None
        out = np.zeros((len(batch["error"]), 0 if z is None else z.shape[1]), np.float32)
        if z is not None:
            out[good] = z
        return {"id": batch["id"], "embedding": out, "error": batch["error"]}

    def encode(self, values: np.ndarray) -> np.ndarray:
        if values.dtype != object:  # images: one call
            values = torch.from_numpy(np.ascontiguousarray(values))
            return self.task.encode(self.towers, self.side, values, self.tokenize, self.device).float().cpu().numpy()
        # texts: by length, in chunks, so that a chunk pads to its own longest text (twice the rows/s
        # of one padded call on short texts, measured on CPU)
        texts = [str(v) for v in values]
        order = np.argsort([len(t) for t in texts], kind="stable")
        z = None
        for lo in range(0, len(order), self.text_chunk):
            rows = order[lo : lo + self.text_chunk]
            part = self.task.encode(self.towers, self.side, [texts[i] for i in rows], self.tokenize, self.device)
            if z is None:
                z = np.empty((len(texts), part.shape[1]), np.float32)
            z[rows] = part.float().cpu().numpy()
        return z


@dataclass
class Pool:
    """How the replicas run: `workers` of them, each with `cpus` CPUs (and a GPU with use_gpu),
    `batch_size` rows a call."""

    workers: int = 2
    use_gpu: bool = False
    batch_size: int = 256
    cpus: float | None = None  # None: 1, or what the cluster leaves beside the decode tasks

    def replica_cpus(self, decode_cpus: float) -> float:
        if self.cpus is not None:
            return self.cpus
        free = ray.cluster_resources().get("CPU", 0) - decode_cpus
        if free <= 0:
            raise ConfigError(f"the cluster's {ray.cluster_resources().get('CPU', 0):g} CPUs leave none beside "
                              f"the decode tasks (dataset.decode_cpus={decode_cpus})")
        return min(1.0, free / self.workers)

    def embed(self, rows: ray.data.Dataset, source: TowersSource, side: str, decode_cpus: float = 1.0) -> ray.data.Dataset:
        """`rows` ({"id", "a", "error"}) embedded by the pool, in order."""
        cpus = self.replica_cpus(decode_cpus)
        rows = rows.repartition(target_num_rows_per_block=self.batch_size)  # a file is a block: one per call instead
        return rows.map_batches(SideEncoder, fn_constructor_kwargs={"source": source, "side": side, "use_gpu": self.use_gpu,
                                                                    "threads": int(cpus)},
                                compute=ray.data.ActorPoolStrategy(size=self.workers), batch_size=self.batch_size,
                                batch_format="numpy", num_cpus=cpus, num_gpus=1 if self.use_gpu else 0)


def ordered(verbose: bool = False) -> None:
    """Ray Data keeps the input's order (the driver numbers rows and matches ids by position)
    and, unless `verbose`, its progress bars out of the console."""
    import logging

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context.enable_progress_bars = False


@dataclass
class Embedded:
    """A batch as the driver reads it: the good rows' ids (the input's `id`, or its position) and
    embeddings, their positions in the input, and the bad rows' reasons."""

    ids: np.ndarray
    embeddings: np.ndarray
    positions: np.ndarray
    errors: list[str]


def read_back(embedded: ray.data.Dataset, ids_are_positions: bool, batch_size: int | None = None) -> Iterator[Embedded]:
    """The pipeline's output in input order, bad rows dropped (their reasons kept)."""
    position = 0
    for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n = len(batch["error"])
        positions = np.arange(position, position + n)
        position += n
        good = batch["error"] == ""
        ids = positions if ids_are_positions else batch["id"]
        yield Embedded(ids[good], batch["embedding"][good], positions[good], [str(e) for e in batch["error"][~good]])


# ----------------------------------------------------------------------------- train.py embed


def dataset_rows(dataset: DatasetOptions, task: type[Task], side: str, seed: int = 0,
                 verbose: bool = False) -> tuple[ray.data.Dataset, bool]:
    """The data's rows of one side, decoded ({"id", "a", "error"}), every row of `dataset.path`;
    and whether the ids are positions (the data has no `id` column)."""
    kind = task.sides[SIDES.index(side)] or task.sides[0]
    column = dataset.side_columns(task.sides)[side if side in dataset.side_columns(task.sides) else "a"]
    one_side = dataset.model_copy(update={"columns": Columns(a=column)})
    fs, files, _ = dataset.listing()
    has_id = dataset.kind == "column" and "id" in dataset.columns_found(fs, files)
    ds = decoded_dataset(one_side, (kind, None), None, seed, verbose, passed=("id",) if has_id else ())
    if not has_id:  # the position is the id: numbered by the driver, in order
        ds = ds.map_batches(_with_blank_id, batch_format="numpy")
    return ds, not has_id


def _with_blank_id(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch | {"id": np.full(len(batch["error"]), "", dtype=object)}


def embed(source: TowersSource, dataset: DatasetOptions, side: str, output: str, pool: Pool,
          shard_rows: int = 100_000, seed: int = 0, verbose: bool = False) -> dict[str, Any]:
    """Every row of the data embedded by one side of the towers, written to `output` as parquet
    shards (`id`, `embedding`) with `embeddings.json` (counts, dimension, time); the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    task = source.task()
    if side not in SIDES:
        raise ConfigError(f"--side: a or b, got {side!r}")
    fs, directory = _output_dir(output)
    ordered(verbose)
    rows, by_position = dataset_rows(dataset, task, side, seed, verbose)
    embedded = pool.embed(rows, source, side, dataset.decode_cpus)
    start, done, skipped, examples, files, dim = time.time(), 0, 0, [], [], 0
    ids_part, z_part = [], []

    def write(ids: np.ndarray, z: np.ndarray) -> None:
        table = pa.table({"id": pa.array(ids.astype(np.int64) if by_position else ids.astype(str)),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1])})
        name = f"part-{len(files):05d}.parquet"
        pq.write_table(table, f"{directory}/{name}", filesystem=fs)
        files.append(name)
        print(f"[distributed_cl] embedded {done} rows ({skipped} skipped), {done / (time.time() - start):.0f} rows/s",
              file=sys.stderr, flush=True)

    def flush(last: bool = False) -> None:
        """Write every full shard of what has arrived (and, when `last`, the rest)."""
        if not ids_part:
            return
        ids, z = np.concatenate(ids_part), np.concatenate(z_part).astype(np.float32)
        cut = len(ids) if last else len(ids) - len(ids) % shard_rows
        for lo in range(0, cut, shard_rows):
            write(ids[lo : min(lo + shard_rows, cut)], z[lo : min(lo + shard_rows, cut)])
        ids_part[:], z_part[:] = ([ids[cut:]], [z[cut:]]) if cut < len(ids) else ([], [])

    first_batch, first_rows = None, 0  # the rate is taken after start-up (the replicas' model loading)
    for part in read_back(embedded, by_position):
        if first_batch is None:
            first_batch, first_rows = time.time(), len(part.ids)
        skipped += len(part.errors)
        examples += part.errors[: max(0, 5 - len(examples))]
        if len(part.ids):
            ids_part.append(part.ids)
            z_part.append(part.embeddings)
            done += len(part.ids)
            dim = part.embeddings.shape[1]
        if sum(map(len, ids_part)) >= shard_rows:
            flush()
    flush(last=True)
    seconds = time.time() - start
    steady = time.time() - first_batch if first_batch is not None else 0.0
    summary = {"rows": done + skipped, "embedded": done, "skipped": skipped, "skipped_examples": examples,
               "dim": dim, "side": side, "ids": "position" if by_position else "id", "files": files,
               "towers": source.run or "untrained", "seconds": round(seconds, 3),
               "rows_per_s": round((done - first_rows) / steady, 1) if steady > 0 and done > first_rows else None}
    import json

    with fs.open_output_stream(f"{directory}/embeddings.json") as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def _output_dir(output: str):
    import pyarrow.fs as pafs

    if "://" in output:
        fs, path = pafs.FileSystem.from_uri(output)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(output))
    fs.create_dir(path, recursive=True)
    if fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        raise ConfigError(f"--output: {output} is not empty")
    return fs, path


def read_embeddings(directory: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, embeddings (n, d) float32) of what `embed` wrote to a local `directory`, in the input's order."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = json.loads(Path(directory, "embeddings.json").read_text())["files"]
    table = pa.concat_tables([pq.read_table(Path(directory, name)) for name in files])
    column = table.column("embedding").combine_chunks()
    return table.column("id").to_numpy(), column.flatten().to_numpy().reshape(len(table), -1)
