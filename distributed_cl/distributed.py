"""Rank/world helpers and the differentiable all-gather behind every distributed loss.

The gradient contract: each rank computes the loss of its own anchors against candidates
gathered from every rank. The gather's backward must hand each rank the SUM of all ranks'
gradients for its slice (copying only the own slice, or averaging, gives 1/W-scaled or wrongly
directed gradients); then DDP's mean of the ranks' gradients equals the single-process gradient
on the concatenated batch. Local sizes may differ between ranks: sizes are exchanged, slices
padded to the largest, gathered and stripped.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "get_rank",
    "get_world_size",
    "is_distributed",
    "all_gather_sizes",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_sum",
]


def is_distributed() -> bool:
    """True when a torch.distributed process group is up (Ray Train workers, torchrun, tests)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's local batch size, in rank order. One tiny collective."""
    if get_world_size() == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's `x` (dim 0) in rank order; pads to the largest size and strips."""
    max_n = max(sizes)
    if x.shape[0] < max_n:
        x = torch.cat([x, x.new_zeros((max_n - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Every rank's loss touched every slice: sum them all, keep our own slice. An all-reduce
        # (not reduce-scatter) because gloo has no reduce-scatter and the tensor is only N x d.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: get_rank()])
        return grad[start : start + ctx.sizes[get_rank()]], None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Differentiable all-gather along dim 0; local sizes may differ between ranks.

    `sizes` (from `all_gather_sizes`) saves the size exchange when the caller already has it.
    With one process this returns `x` itself.
    """
    if get_world_size() == 1:
        return x
    sizes = sizes if sizes is not None else all_gather_sizes(x.shape[0], x.device)
    return _AllGatherWithGrad.apply(x, sizes)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """All-gather without autograd, for labels and other integer metadata."""
    if get_world_size() == 1:
        return x
    sizes = sizes if sizes is not None else all_gather_sizes(x.shape[0], x.device)
    return _gather_padded(x, sizes)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new tensor; no autograd), e.g. anchor counts."""
    if get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def all_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` holds on every rank: a streamed epoch ends for all when one rank runs out."""
    if get_world_size() == 1:
        return flag
    x = torch.tensor([int(flag)], device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return bool(x.item())


@torch.no_grad()
def all_ranks_max(n: int, device: torch.device | str = "cpu") -> int:
    """The largest of every rank's `n`."""
    if get_world_size() == 1:
        return n
    x = torch.tensor([n], device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank's buffers (BatchNorm's running statistics) made rank `src`'s, in place."""
    if get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)


def _local_rank_entry(fn, rank: int, world: int, init_file: str, args: tuple, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            # pickled by value: torch's queue would share a tensor's storage through a file
            # descriptor that this process must serve until the caller reads it, and it may have
            # exited by then (seen under load as an EOFError in the caller)
            results.put(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_on_local_ranks(fn, world: int, *args, timeout: float = 600.0, start_method: str = "forkserver"):
    """Run `fn(rank, world, *args)` on `world` fresh gloo processes of one thread each, on this
    machine, and return rank 0's result. Raises (never hangs) if a rank fails or stalls.
    For tests and benchmarks; `fn` must be importable (a module-level function).

    "forkserver": the ranks are forked from a server process that has imported the training
    stack and `fn`'s module once (the first call's; the server serves every later call of this
    process and keeps the environment it started with). It starts no threads, so forking it is
    safe, and a rank starts in a fraction of a second instead of seconds of imports. "spawn": a
    new interpreter a rank, for measurements that must charge a rank for nothing it inherits."""
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload([__name__, "distributed_cl.train_loop", fn.__module__])
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_local_rank_entry, args=(fn, r, world, init_file, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        result, finished, deadline = None, False, time.monotonic() + timeout
        while not finished and time.monotonic() < deadline:
            try:
                result, finished = pickle.loads(results.get(timeout=1)), True
            except queue.Empty:  # a rank that died (killed, aborted) ends the wait at once
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
        for p in procs:
            p.join(timeout=60 if finished else 1)
            if p.is_alive():
                p.kill()
    codes = [p.exitcode for p in procs]
    if codes != [0] * world:
        raise RuntimeError(f"rank exit codes {codes} (None: stalled, killed after {timeout}s)")
    return result
