"""Loss forward+backward on W gloo ranks x 1 thread: ours vs lightly, open_clip and the GEMM floor.

    python experiments/bench_loss.py            # n=1024 per rank, d=128, 2 ranks

Each method runs in its own fresh set of rank processes. Time: median step on rank 0.
Memory, measured after the timed steps: glibc is switched to a fixed mmap threshold (so freed
tensors leave the resident set), the kernel's peak-RSS mark is reset, one step runs, and the
peak's growth over the resident set before it is reported (max over ranks). The GEMM floor is
the three matrix products no contrastive loss can skip (logits forward; both operands'
gradients), same shapes.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl.distributed import run_on_local_ranks  # noqa: E402


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def step_peak_memory_mib(step) -> float:
    """Peak resident-set growth while `step` runs (Linux, glibc)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks go back to the OS when freed
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    before = _status_mib("VmRSS")
    step()
    return _status_mib("VmHWM") - before


def make_step(method: str, n: int, d: int, rank: int, world: int):
    """Returns a closure running one forward+backward of `method` on this rank's inputs."""
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(n, d, generator=g).requires_grad_()
    b = torch.randn(n, d, generator=g).requires_grad_()

    if method == "ours NTXent":
        from distributed_cl.losses import NTXentLoss

        loss_fn = NTXentLoss(temperature=0.5)
        return lambda: loss_fn(a, b).backward()
    if method == "lightly NTXent":
        from lightly.loss import NTXentLoss as LightlyNTXent

        loss_fn = LightlyNTXent(temperature=0.5, gather_distributed=True)
        return lambda: loss_fn(a, b).backward()
    if method == "ours CLIP":
        from distributed_cl.losses import ClipLoss

        loss_fn = ClipLoss(temperature=0.07)
        return lambda: loss_fn(a, b).backward()
    if method == "open_clip CLIP":
        from open_clip.loss import ClipLoss as OpenClipLoss

        loss_fn = OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        logit_scale = torch.tensor(1 / 0.07).log().requires_grad_()

        def step():
            loss_fn(F.normalize(a, dim=1), F.normalize(b, dim=1), logit_scale.exp()).backward()

        return step
    if method.startswith("GEMM floor"):
        rows = 2 * n if "NTXent" in method else n  # NTXent: 2n anchors x 2N candidates
        q = torch.randn(rows, d, generator=g)
        k = torch.randn(rows * world, d, generator=g)
        grad_logits = torch.randn(rows, rows * world, generator=g)

        def step():
            logits = q @ k.T  # forward
            grad_logits @ k  # d logits / d anchors
            grad_logits.T @ q  # d logits / d candidates
            del logits

        return step
    raise ValueError(method)


def _rank_main(rank, world, method, n, d, steps, warmup):
    step = make_step(method, n, d, rank, world)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    peak = torch.tensor([step_peak_memory_mib(step)])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return statistics.median(times), float(peak)


def run(method, n, d, world, steps, warmup):
    return run_on_local_ranks(_rank_main, world, method, n, d, steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="samples per rank")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    groups = [
        ("NTXent", ["ours NTXent", "lightly NTXent", "GEMM floor (NTXent)"]),
        ("CLIP", ["ours CLIP", "open_clip CLIP", "GEMM floor (CLIP)"]),
    ]
    print(f"{args.world} gloo ranks x 1 thread, n={args.n} per rank, d={args.dim}, median of {args.steps} steps")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print("| method | step (ms) | peak memory (MiB) | vs peer | vs GEMM floor |")
    print("|---|---:|---:|---:|---:|")
    for _, methods in groups:
        results = {m: run(m, args.n, args.dim, args.world, args.steps, args.warmup) for m in methods}
        ours, peer, floor = (results[m][0] for m in methods)
        for m in methods:
            t, mem = results[m]
            vs_peer = f"{t / peer:.2f}x" if m != methods[2] else ""
            print(f"| {m} | {t * 1e3:.1f} | {mem:.0f} | {vs_peer} | {t / floor:.2f}x |")


if __name__ == "__main__":
    main()
