"""Run a function on W gloo ranks in fresh processes; fail (not hang) if a rank stalls."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(fn, rank, world, init_file, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int, *args, timeout: float = 180.0) -> None:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init_file, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        assert not stuck, f"ranks {stuck} did not finish within {timeout}s (hang in a collective?)"
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"rank exit codes {codes}"
