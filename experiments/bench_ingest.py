"""Own data against the built-in in-memory path: the default image recipe (SimCLR, global batch
256, 2 CPU workers x 1 thread) fed from each source, side by side in one run.

    python experiments/bench_ingest.py                # writes its data under /tmp/bench_ingest first
    python experiments/bench_ingest.py --steps 80 --data /tmp/bench_ingest

Rows (samples/s of train.py, the median over its report windows after the first):
- built-in: Fashion-MNIST from Debian's IDX files, in memory (the reference);
- imagefolder, cached: the same images as 28x28 PNGs (`python -m distributed_cl.data.examples`),
  decoded once by Ray Data, then served as the built-in is;
- imagefolder / webdataset, streamed: decoded by Ray Data CPU tasks while training; on 2 cores the
  workers get 0.5 CPU each and the decode tasks the rest; with deterministic order (the default)
  and without;
- decode stage alone: Ray Data reading and decoding the PNG folder with 1 CPU, no training;
- streaming memory: peak RSS of a training worker streaming N and 10 N synthetic 28x28 samples
  (webdataset shards, one epoch each).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed_cl import trainer  # noqa: E402
from distributed_cl.config import Config  # noqa: E402

CONFIG = ROOT / "experiments" / "image_simclr.yaml"
SMALL_EVAL = ["data.eval_bank_size=1000", "data.eval_test_size=1000"]
STREAM = ["dataset.cache=false", "train.cpus_per_worker=0.5", "dataset.decode_cpus=0.5"]


def write_data(root: Path) -> None:
    if not (root / "fashion_mnist_png").is_dir():
        subprocess.run([sys.executable, "-m", "distributed_cl.data.examples", "--out", str(root), "--only",
                        "fashion_mnist_png"], check=True, cwd=ROOT)
    if not (root / "fashion_mnist_wds").is_dir():  # the same PNGs, 1,000 to a shard
        files = sorted((root / "fashion_mnist_png" / "train").glob("*/*.png"))
        order = np.random.default_rng(0).permutation(len(files))  # shards mix the classes, as real ones do
        write_shards(root / "fashion_mnist_wds", [(files[i].parent.name, files[i].read_bytes()) for i in order])
    rng = np.random.default_rng(0)
    for n in (6_000, 60_000):
        if not (root / f"synthetic_{n}").is_dir():
            from PIL import Image

            samples = []
            for _ in range(n):
                out = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L").save(out, "PNG")
                samples.append(("noise", out.getvalue()))
            write_shards(root / f"synthetic_{n}", samples)


def write_shards(directory: Path, samples: list[tuple[str, bytes]], per_shard: int = 1000) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(samples), per_shard):
        with tarfile.open(tmp / f"shard-{s // per_shard:06d}.tar", "w") as tar:
            for i, (label, data) in enumerate(samples[s : s + per_shard], start=s):
                for ext, payload in (("png", data), ("cls", label.encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    tmp.rename(directory)


class PeakWorkerRSS:
    """The largest resident set of any Ray Train worker process while it runs (polled every 0.2 s)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                        rss = next(int(line.split()[1]) for line in (entry / "status").read_text().splitlines()
                                   if line.startswith("VmRSS:"))
                        self.peak = max(self.peak, rss * 1024)
                except (OSError, StopIteration):
                    continue

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def train_rate(name: str, overrides: list[str], steps: int, storage: str) -> tuple[float, int]:
    config = Config.load(CONFIG, overrides + [f"train.max_steps={steps}", "train.log_every=10",
                                              f"train.checkpoint_every={steps}", f"train.name=ingest-{name}",
                                              f"train.storage_path={storage}"])
    with PeakWorkerRSS() as rss:
        summary = trainer.run(config, console=False)
    with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f) if r["samples_per_s"]]
    return statistics.median(rates[1:]), rss.peak


def decode_rate(root: Path) -> float:
    import ray

    from distributed_cl.data.formats import decoded_dataset

    config = Config.load(overrides=["dataset.format=imagefolder", f"dataset.path={root}/fashion_mnist_png/train",
                                    "dataset.image_size=28", "dataset.eval_fraction=0.01", "dataset.decode_cpus=1"])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    start, rows = time.perf_counter(), 0
    for batch in decoded_dataset(config.dataset, ("image", None), "train", config.train.seed).iter_batches(batch_size=1024, batch_format="numpy"):
        rows += len(batch["error"])
    rate = rows / (time.perf_counter() - start)
    ray.shutdown()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="train.py steps per row")
    parser.add_argument("--data", default="/tmp/bench_ingest", help="where the benchmark's data is written")
    args = parser.parse_args()
    root = Path(args.data)
    write_data(root)
    png = [f"dataset.path={root}/fashion_mnist_png/train", f"dataset.eval_path={root}/fashion_mnist_png/test",
           "dataset.format=imagefolder", "dataset.image_size=28", "dataset.eval_bank_size=1000",
           "dataset.eval_max_rows=1000"]
    wds = [f"dataset.path={root}/fashion_mnist_wds", "dataset.format=webdataset", "dataset.columns.a=png",
           "dataset.columns.label=cls", "dataset.image_size=28", "dataset.eval_fraction=0.02",
           "dataset.eval_bank_size=1000", "dataset.eval_max_rows=1000"]
    rows = [("decode stage alone (Ray Data, 1 CPU, PNG folder)", decode_rate(root), None)]
    with tempfile.TemporaryDirectory() as storage:
        for name, overrides in [
            ("built-in in-memory (reference)", SMALL_EVAL),
            ("imagefolder, cached", png + ["dataset.cache=true"]),
            ("imagefolder, streamed", png + STREAM),
            ("imagefolder, streamed, order not kept", png + STREAM + ["dataset.deterministic=false"]),
            ("webdataset, streamed", wds + STREAM),
            ("webdataset, streamed, order not kept", wds + STREAM + ["dataset.deterministic=false"]),
        ]:
            rate, rss = train_rate(name.split(",")[0].split()[0] + str(len(rows)), overrides, args.steps, storage)
            rows.append((name, rate, rss))
        for n in (6_000, 60_000):  # one epoch each
            synthetic = [f"dataset.path={root}/synthetic_{n}", "dataset.format=webdataset", "dataset.columns.a=png",
                         "dataset.image_size=28", "dataset.eval_fraction=0.01", "dataset.eval_max_rows=200"]
            rate, rss = train_rate(f"synthetic{n}", synthetic + STREAM, int(n * 0.98) // 256, storage)
            rows.append((f"webdataset, streamed, {n:,} synthetic samples (one epoch)", rate, rss))
    reference = rows[1][1]
    print("\n| path | samples/s | of built-in | peak worker RSS |")
    print("|---|---:|---:|---:|")
    for name, rate, rss in rows:
        share = f"{rate / reference:.0%}" if rss is not None else ""
        print(f"| {name} | {rate:,.0f} | {share} | {'' if rss is None else f'{rss / 2**20:,.0f} MiB'} |")


if __name__ == "__main__":
    main()
