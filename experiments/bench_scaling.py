"""Training throughput of the default image SimCLR run with 1 and 2 Ray Train workers
(1 thread each), same global batch, side by side in one run.

    python experiments/bench_scaling.py            # 100 steps each, global batch 256

samples/s is the median over report windows after the first (warm-up) window.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl import trainer  # noqa: E402
from distributed_cl.config import Config  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "image_simclr.yaml")


def samples_per_second(num_workers: int, steps: int, storage: str) -> float:
    config = Config.load(CONFIG, [
        f"train.num_workers={num_workers}", f"train.max_steps={steps}", "train.log_every=20",
        f"train.checkpoint_every={steps}", f"train.name=scaling-{num_workers}", f"train.storage_path={storage}",
        "data.eval_bank_size=1000", "data.eval_test_size=1000",
    ])
    summary = trainer.run(config)
    with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f) if r["samples_per_s"]]
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as storage:
        rates = {w: samples_per_second(w, args.steps, storage) for w in (1, 2)}
    print("\n| workers (1 thread each) | samples/s | speed-up |")
    print("|---:|---:|---:|")
    for w, rate in rates.items():
        print(f"| {w} | {rate:.0f} | {rate / rates[1]:.2f}x |")


if __name__ == "__main__":
    main()
