"""The largest global batch one training step takes under a fixed memory cap per worker: plain
DDP against gradient caching (train.grad_cache_chunk), 2 gloo ranks x 1 thread.

    python experiments/bench_grad_cache.py      # cap 256 MiB per worker, chunks of 64

The step is the default image recipe's: its SimCLR towers (small CNN, width 16, BatchNorm) on
two views of 28x28 images, NT-Xent with global negatives (chunk_size 1024 for both methods, so
the logits never set the limit), AdamW. Each worker builds its model, then moves into a memory
cgroup of its own whose limit is the cap (Linux; root), so what it allocates from then on (its
batch, activations, gradients, DDP's buckets, the optimizer's state) is charged there and past
the cap the kernel kills it (glibc returns freed blocks of 64 KiB and more to the system at once,
for both methods). The batch doubles from 256 per worker until a step fails, then
halves the gap down to a sixteenth of the batch. (An address-space limit, RLIMIT_AS, was tried
first: it counts glibc's 64 MiB arena reservations and thread stacks, not memory.)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl.config import Config  # noqa: E402
from distributed_cl.distributed import run_on_local_ranks  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "image_simclr.yaml")


def _cgroup(rank: int) -> str:
    v1 = "/sys/fs/cgroup/memory"
    return os.path.join(v1 if os.path.isdir(v1) else "/sys/fs/cgroup", f"distributed_cl_bench_rank{rank}")


def _cap_memory(rank: int, cap_bytes: int) -> None:
    """Charge what this process allocates from now on to a cgroup limited to `cap_bytes`."""
    group = _cgroup(rank)
    os.makedirs(group, exist_ok=True)
    limit = "memory.limit_in_bytes" if os.path.exists(os.path.join(group, "memory.limit_in_bytes")) else "memory.max"
    with open(os.path.join(group, limit), "w") as f:
        f.write(str(cap_bytes))
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _step_rank(rank: int, world: int, method: str, local_batch: int, cap_mib: int, chunk: int):
    from distributed_cl.losses import NTXentLoss
    from distributed_cl.losses.ntxent import NTXentOptions
    from distributed_cl.tasks import ContrastiveModel
    from distributed_cl.tasks.image import ImageTask
    from distributed_cl.train_loop import train_step

    config = Config.load(CONFIG)
    torch.manual_seed(0)
    net = ContrastiveModel(ImageTask.build_towers(config), NTXentLoss(0.1, chunk_size=1024), NTXentOptions())
    model = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    # glibc: blocks of 64 KiB and more are mmapped and unmapped when freed (as bench_loss.py
    # measures), for both methods alike; else freed activations linger in the heap, charged
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    _cap_memory(rank, cap_mib * 2**20)
    start = time.perf_counter()
    try:
        g = torch.Generator().manual_seed(rank)
        batch = {"a": torch.rand(local_batch, 1, 28, 28, generator=g),
                 "b": torch.rand(local_batch, 1, 28, 28, generator=g),
                 "labels": torch.zeros(local_batch, dtype=torch.long)}
        train_step(model, net, optimizer, batch, contextlib.nullcontext,
                   grad_cache_chunk=chunk if method == "gradient caching" else None)
        return True, time.perf_counter() - start
    except (RuntimeError, MemoryError):  # the kernel's OOM killer usually comes first
        return False, time.perf_counter() - start


def fits(method: str, local_batch: int, cap_mib: int, chunk: int) -> tuple[bool, float]:
    try:
        # spawned: a forked rank would charge its copies of inherited pages to the capped cgroup
        return run_on_local_ranks(_step_rank, 2, method, local_batch, cap_mib, chunk, timeout=600,
                                  start_method="spawn")
    except RuntimeError:  # a rank was killed past the cap
        return False, float("nan")


def largest_batch(method: str, cap_mib: int, chunk: int) -> tuple[int, float]:
    """The largest local batch (to a sixteenth) whose step fits, and that step's seconds."""
    good, bad, seconds = 0, None, float("nan")
    size = 256
    while bad is None:
        ok, t = fits(method, size, cap_mib, chunk)
        print(f"  {method}: {2 * size:,} global -> {'fits' if ok else 'fails'} ({t:.1f} s)", flush=True)
        if ok:
            good, seconds, size = size, t, size * 2
        else:
            bad = size
    while bad - good > max(64, good // 16):  # to a sixteenth: each try at the top takes a minute
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
    parser.add_argument("--cap-mib", type=int, default=256, help="memory cap per worker, above its model")
    parser.add_argument("--chunk", type=int, default=64, help="train.grad_cache_chunk")
    args = parser.parse_args()
    try:
        results = {m: largest_batch(m, args.cap_mib, args.chunk) for m in ("plain DDP", "gradient caching")}
    finally:
        for rank in range(2):
            with contextlib.suppress(OSError):
                os.rmdir(_cgroup(rank))
    plain = results["plain DDP"][0]
    print(f"\n2 gloo ranks x 1 thread, a {args.cap_mib} MiB memory cgroup per worker above its model, "
          f"torch {torch.__version__}")
    print("| method | largest global batch | its step (s) | vs plain DDP |")
    print("|---|---:|---:|---:|")
    for method, (local, seconds) in results.items():
        print(f"| {method} | {2 * local:,} | {seconds:.1f} | {local / plain:.1f}x |")


if __name__ == "__main__":
    main()
