"""Loss forward+backward on W gloo ranks x 1 thread: ours vs lightly, open_clip and the GEMM floor.

    python experiments/bench_loss.py            # n=1024 per rank, d=128, 2 ranks
    python experiments/bench_loss.py --device cuda --dim 512   # one GPU: plain, chunked, peers, bf16
    python experiments/bench_loss.py --siglip   # SigLIP vs open_clip's, global batch 2,048 to 65,536

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
from distributed_cl.profiling import LargestTensors  # noqa: E402


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


def make_step(method: str, n: int, d: int, rank: int, world: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32, chunk_size: int = 2048):
    """Returns a closure running one forward+backward of `method` on this rank's inputs."""
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    chunk = chunk_size if method.endswith("chunked") else None

    if method.startswith("ours NTXent"):
        from distributed_cl.losses import NTXentLoss

        loss_fn = NTXentLoss(temperature=0.5, chunk_size=chunk)
        return lambda: loss_fn(a, b).backward()
    if method == "naive NTXent":  # the textbook version: the full (2N x 2N) matrix and F.cross_entropy
        def step():
            z = F.normalize(torch.cat([a, b]), dim=1)
            logits = (z @ z.T).float() / 0.5
            logits.fill_diagonal_(float("-inf"))
            targets = torch.arange(len(z), device=z.device).roll(n)
            F.cross_entropy(logits, targets).backward()

        return step
    if method == "lightly NTXent":
        from lightly.loss import NTXentLoss as LightlyNTXent

        loss_fn = LightlyNTXent(temperature=0.5, gather_distributed=True)
        return lambda: loss_fn(a, b).backward()
    if method.startswith("ours CLIP"):
        from distributed_cl.losses import ClipLoss

        loss_fn = ClipLoss(temperature=0.07, chunk_size=chunk).to(device)
        return lambda: loss_fn(a, b).backward()
    if method == "open_clip CLIP":
        from open_clip.loss import ClipLoss as OpenClipLoss

        loss_fn = OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        logit_scale = torch.tensor(1 / 0.07, device=device).log().requires_grad_()

        def step():
            loss_fn(F.normalize(a, dim=1), F.normalize(b, dim=1), logit_scale.exp()).backward()

        return step
    if method.startswith("ours SigLIP"):
        from distributed_cl.losses import SigLipLoss

        loss_fn = SigLipLoss(chunk_size=chunk, neighbour_exchange="neighbour" in method).to(device)
        return lambda: loss_fn(a, b).backward()
    if method == "open_clip SigLIP":  # its default: bidirectional neighbour exchange, autograd through it
        from open_clip.loss import SigLipLoss as OpenClipSigLip

        loss_fn = OpenClipSigLip(rank=rank, world_size=world)
        logit_scale = torch.tensor(10.0, device=device).log().requires_grad_()
        logit_bias = torch.tensor(-10.0, device=device, requires_grad=True)

        def step():
            loss_fn(F.normalize(a, dim=1), F.normalize(b, dim=1), logit_scale.exp(), logit_bias).backward()

        return step
    if method.startswith("GEMM floor"):
        rows = 2 * n if "NTXent" in method else n  # NTXent: 2n anchors x 2N candidates
        q = torch.randn(rows, d, generator=g).to(device, dtype)
        k = torch.randn(rows * world, d, generator=g).to(device, dtype)
        grad_logits = torch.randn(rows, rows * world, generator=g).to(device, dtype)

        def step():
            logits = q @ k.T  # forward
            grad_logits @ k  # d logits / d anchors
            grad_logits.T @ q  # d logits / d candidates
            del logits

        return step
    raise ValueError(method)


def candidate_rows(step, d: int) -> int:
    """The most rows of any (rows x d) tensor one step makes: how many candidate embeddings (or
    their gradients) a rank holds at once. Logits tiles have other widths."""
    with LargestTensors(width=d) as sizes:
        step()
    return sizes.rows


def _rank_main(rank, world, method, n, d, steps, warmup, chunk_size=2048, count_rows=False):
    step = make_step(method, n, d, rank, world, chunk_size=chunk_size)
    if count_rows:
        most = torch.tensor([candidate_rows(step, d)])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most)
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


def run(method, n, d, world, steps, warmup, chunk_size=2048, count_rows=False):
    return run_on_local_ranks(_rank_main, world, method, n, d, steps, warmup, chunk_size, count_rows, timeout=3600)


SIGLIP_METHODS = ["ours SigLIP", "ours SigLIP chunked", "ours SigLIP neighbour", "ours SigLIP neighbour chunked",
                  "open_clip SigLIP", "GEMM floor (SigLIP)"]


def siglip_logits_gib(method: str, n: int, world: int, chunk: int) -> float:
    """The largest logits-sized buffers a method holds at once, per rank, in GiB (fp32): ours holds
    one tile and its softplus; open_clip's autograd keeps about nine (n x n) blocks a rank
    (70 MiB measured at n=1024, 2 ranks)."""
    if "chunked" in method:
        return 2 * min(chunk, n) ** 2 * 4 / 2**30
    if method == "open_clip SigLIP":
        return 9 * world * n * n * 4 / 2**30
    if "neighbour" in method:
        return 2 * n * n * 4 / 2**30
    return 2 * n * n * world * 4 / 2**30


def siglip_main(args) -> None:
    """Time and peak memory against the global batch, every method in fresh rank processes. A
    method whose logits alone would pass --max-gib per rank is not run (the machine would swap)."""
    print(f"SigLIP, {args.world} gloo ranks x 1 thread, d={args.dim}, chunk_size {args.chunk_size}, "
          f"median of {args.steps} steps; torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print("| global batch | method | step (ms) | peak memory (MiB) | vs open_clip (time) | vs open_clip (memory) |")
    print("|---:|---|---:|---:|---:|---:|")
    for total in args.siglip_batches:
        n = total // args.world
        results = {}
        for m in SIGLIP_METHODS if not args.rows_only else ():
            need = siglip_logits_gib(m, n, args.world, args.chunk_size)
            results[m] = None if need > args.max_gib else run(m, n, args.dim, args.world, args.steps, args.warmup,
                                                              args.chunk_size)
        peer = results.get("open_clip SigLIP")
        for m in results:
            if results[m] is None:
                need = siglip_logits_gib(m, n, args.world, args.chunk_size)
                print(f"| {total:,} | {m} | not run: needs ~{need:.0f} GiB a rank | | | |", flush=True)
                continue
            t, mem = results[m]
            vs = (f"{t / peer[0]:.2f}x", f"{mem / peer[1]:.3f}x") if peer and m != "open_clip SigLIP" else ("", "")
            print(f"| {total:,} | {m} | {t * 1e3:.0f} | {mem:.0f} | {vs[0]} | {vs[1]} |", flush=True)
        if total in args.rows_at:
            print(f"| {total:,} | candidate rows held at once (rows x {args.dim} tensors, max over ranks): "
                  + ", ".join(f"{m} {run(m, n, args.dim, args.world, 1, 0, args.chunk_size, True):,}"
                              for m in SIGLIP_METHODS[:5]) + " | | | | |", flush=True)


CUDA_GROUPS = [["ours CLIP", "ours CLIP chunked", "open_clip CLIP", "GEMM floor (CLIP)"],
               ["ours NTXent", "ours NTXent chunked", "naive NTXent", "GEMM floor (NTXent)"]]


def cuda_step_stats(method: str, n: int, d: int, dtype: torch.dtype, steps: int, warmup: int, chunk: int):
    """(median step seconds, peak memory GiB above the inputs) of one process on the GPU, or None if out of memory."""
    torch.cuda.empty_cache()
    try:
        step = make_step(method, n, d, 0, 1, "cuda", dtype, chunk)
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.cuda.OutOfMemoryError:
        return None


def cuda_main(args) -> None:
    """One GPU, one process: the issue's H100 table, plain and chunked, fp32 and bf16 inputs."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the exact path)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, d={args.dim}, median of {args.steps} steps, "
          f"chunk_size {args.chunk_size}\n")
    print("| n, inputs | method | step (ms) | peak memory (GiB) | vs first peer |")
    print("|---|---|---:|---:|---:|")
    for n in args.cuda_n:
        for dtype in (torch.float32, torch.bfloat16):
            for methods in CUDA_GROUPS:
                results = {m: cuda_step_stats(m, n, args.dim, dtype, args.steps, args.warmup, args.chunk_size)
                           for m in methods}
                peer = results[methods[2]]
                for m, r in results.items():
                    label = f"{n:,}, {str(dtype).removeprefix('torch.')}"
                    if r is None:
                        print(f"| {label} | {m} | out of memory | | |")
                        continue
                    vs = f"{r[0] / peer[0]:.2f}x" if peer else ""
                    print(f"| {label} | {m} | {r[0] * 1e3:.1f} | {r[1]:.2f} | {vs} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="samples per rank")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cuda-n", type=int, nargs="+", default=[32768, 65536], help="batch sizes on the GPU")
    parser.add_argument("--chunk-size", type=int, default=4096, help="chunk_size of the chunked losses")
    parser.add_argument("--siglip", action="store_true", help="SigLIP against open_clip's over --siglip-batches")
    parser.add_argument("--siglip-batches", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 65536],
                        help="global batch sizes of the SigLIP table")
    parser.add_argument("--max-gib", type=float, default=7.0, help="SigLIP: skip methods whose logits need more per rank")
    parser.add_argument("--rows-at", type=int, nargs="*", default=[2048, 16384],
                        help="SigLIP: global batches at which to count the candidate rows each method holds")
    parser.add_argument("--rows-only", action="store_true", help="SigLIP: count the candidate rows, time nothing")
    args = parser.parse_args()
    if args.siglip:
        siglip_main(args)
        return
    if args.device == "cuda":
        cuda_main(args)
        return

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
