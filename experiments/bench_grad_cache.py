"""The largest global batch one training step takes under a fixed memory cap per worker: plain
DDP against gradient caching (train.grad_cache_chunk), 2 gloo ranks x 1 thread.

    python experiments/bench_grad_cache.py      # cap 512 MiB per worker, chunks of 256

The step is the default image recipe's: its SimCLR towers (small CNN, width 16, BatchNorm) on
two views of 28x28 images, NT-Xent with global negatives (chunk_size 1024 for both methods, so
the logits never set the limit), AdamW. Each worker builds its model, then caps its address
space at what it has mapped plus the cap (RLIMIT_AS), then makes its batch and takes one step;
an allocation past the cap fails the step. The batch doubles from 256 per worker until a step
fails, then halves the gap down to an eighth of the batch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl.config import Config  # noqa: E402
from distributed_cl.distributed import run_on_local_ranks  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "image_simclr.yaml")


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))


def _step_rank(rank: int, world: int, method: str, local_batch: int, cap_mib: int, chunk: int):
    from distributed_cl.grad_cache import grad_cache_backward
    from distributed_cl.losses import NTXentLoss
    from distributed_cl.tasks import ContrastiveModel
    from distributed_cl.tasks.base import _pair_views
    from distributed_cl.tasks.image import ImageTask

    config = Config.load(CONFIG)
    torch.manual_seed(0)
    net = ContrastiveModel(ImageTask.build_towers(config), NTXentLoss(0.1, chunk_size=1024), _pair_views)
    model = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size_bytes() + cap_mib * 2**20, hard))
    start = time.perf_counter()
    try:
        g = torch.Generator().manual_seed(rank)
        batch = {"a": torch.rand(local_batch, 1, 28, 28, generator=g),
                 "b": torch.rand(local_batch, 1, 28, 28, generator=g),
                 "labels": torch.zeros(local_batch, dtype=torch.long)}
        if method == "gradient caching":
            grad_cache_backward(model, net, batch, chunk, contextlib.nullcontext)
        else:
            model(batch).backward()
        optimizer.step()
        return True, time.perf_counter() - start
    except (RuntimeError, MemoryError):  # "can't allocate memory": both ranks fail at the same point
        return False, time.perf_counter() - start


def fits(method: str, local_batch: int, cap_mib: int, chunk: int) -> tuple[bool, float]:
    try:
        return run_on_local_ranks(_step_rank, 2, method, local_batch, cap_mib, chunk, timeout=600)
    except RuntimeError:  # a rank died or hung past the cap
        return False, float("nan")


def largest_batch(method: str, cap_mib: int, chunk: int) -> tuple[int, float]:
    """The largest local batch (to an eighth) whose step fits, and that step's seconds."""
    good, bad, seconds = 0, None, float("nan")
    size = 256
    while bad is None:
        ok, t = fits(method, size, cap_mib, chunk)
        print(f"  {method}: {2 * size:,} global -> {'fits' if ok else 'fails'} ({t:.1f} s)", flush=True)
        if ok:
            good, seconds, size = size, t, size * 2
        else:
            bad = size
    while bad - good > max(64, good // 8):  # to an eighth: each try at the top takes a minute
        size = (good + bad) // 2 // 64 * 64
        ok, t = fits(method, size, cap_mib, chunk)
        print(f"  {method}: {2 * size:,} global -> {'fits' if ok else 'fails'} ({t:.1f} s)", flush=True)
        if ok:
            good, seconds = size, t
        else:
            bad = size
    return good, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap-mib", type=int, default=512, help="memory cap per worker, above its model")
    parser.add_argument("--chunk", type=int, default=256, help="train.grad_cache_chunk")
    args = parser.parse_args()
    results = {method: largest_batch(method, args.cap_mib, args.chunk) for method in ("plain DDP", "gradient caching")}
    plain = results["plain DDP"][0]
    print(f"\n2 gloo ranks x 1 thread, {args.cap_mib} MiB per worker above its model, torch {torch.__version__}")
    print("| method | largest global batch | its step (s) | vs plain DDP |")
    print("|---|---:|---:|---:|")
    for method, (local, seconds) in results.items():
        print(f"| {method} | {2 * local:,} | {seconds:.1f} | {local / plain:.1f}x |")


if __name__ == "__main__":
    main()
