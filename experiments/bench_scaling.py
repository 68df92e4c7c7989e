"""Training throughput of the default image SimCLR run with 1 and 2 Ray Train workers
(1 thread each), same global batch, side by side in one run; and the same step (data loader,
augmentations, model, NT-Xent with global negatives) under plain DDP + gloo without Ray, to
separate Ray's overhead from the distributed step's.

    python experiments/bench_scaling.py            # 100 steps each, global batch 256

samples/s: for Ray, the median over report windows after the first (warm-up) window; for plain
DDP, 30 timed steps after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl import trainer  # noqa: E402
from distributed_cl.config import Config  # noqa: E402
from distributed_cl.distributed import run_on_local_ranks  # noqa: E402

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


def _plain_ddp_rank(rank: int, world: int, pipeline: str) -> float:
    from distributed_cl.samplers import DistributedRandomBatchSampler
    from distributed_cl.tasks import ContrastiveModel
    from distributed_cl.tasks.image import ImageTask
    from distributed_cl.train_loop import train_step

    config = Config.load(CONFIG, [f"data.pipeline={pipeline}"])
    task = ImageTask(config, rank, world)
    sampler = DistributedRandomBatchSampler(len(task.data.train), config.train.global_batch_size, world, rank)
    torch.manual_seed(0)
    net = ContrastiveModel(ImageTask.build_towers(config), config.loss.build(), config.loss)
    model = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = iter(task.train_batches(sampler))
    for i in range(33):
        if i == 3:
            dist.barrier()
            start = time.perf_counter()
        train_step(model, net, optimizer, next(batches), contextlib.nullcontext)[0].item()  # (loss, stats)
    return 30 * config.train.global_batch_size / (time.perf_counter() - start)


def plain_ddp_samples_per_second(world: int, pipeline: str = "batched") -> float:
    return run_on_local_ranks(_plain_ddp_rank, world, pipeline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as storage:
        ray_rates = {w: samples_per_second(w, args.steps, storage) for w in (1, 2)}
    ddp_rates = {w: plain_ddp_samples_per_second(w) for w in (1, 2)}
    print("\n| run | workers (1 thread each) | samples/s | speed-up |")
    print("|---|---:|---:|---:|")
    for label, rates in (("Ray Train (train.py)", ray_rates), ("plain DDP + gloo, no Ray", ddp_rates)):
        for w, rate in rates.items():
            print(f"| {label} | {w} | {rate:.0f} | {rate / rates[1]:.2f}x |")


if __name__ == "__main__":
    main()
