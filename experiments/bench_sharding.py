"""Peak memory and time per step of one text tower trained under DDP and under FSDP (and FSDP
with activation checkpointing, and LoRA), at the same global batch, side by side in one run.

    python experiments/bench_sharding.py                              # a 232M-parameter Qwen3-shaped tower
    python experiments/bench_sharding.py --layers 4 --hidden 512      # smaller, faster

Each configuration runs on fresh gloo processes (spawned: a rank is charged for nothing it
inherits), 1 thread each; the tower is a random Qwen3 (decoder-only, last-token pooling) built
from its config, InfoNCE over the gathered batch, AdamW. Memory is each process's peak resident
set (what the machine must hold: the weights, gradients and optimizer state, activations, and
Python with torch, about 0.4 GiB, whatever the model), the largest rank's; time is the median
step after the first.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl.distributed import run_on_local_ranks  # noqa: E402


def _rank(rank: int, world: int, strategy: str, arch: dict, global_batch: int, length: int, steps: int,
          checkpointing: bool, lora: bool, compiled: bool) -> dict:
    from torch import nn

    from distributed_cl.losses import InfoNCELoss
    from distributed_cl.losses.ntxent import NTXentOptions
    from distributed_cl.models.text import TextTower, TextTowerOptions
    from distributed_cl.sharding import activation_checkpointing, compile_blocks, fully_shard_model
    from distributed_cl.tasks import ContrastiveModel
    from distributed_cl.tasks.text import SiameseText
    from distributed_cl.train_loop import train_step

    torch.manual_seed(0)
    options = TextTowerOptions(pooling="last", lora={"r": 16, "alpha": 32} if lora else None)
    net = ContrastiveModel(SiameseText(TextTower(options, architecture=arch)), InfoNCELoss(0.05),
                           NTXentOptions()).train()
    if checkpointing:
        activation_checkpointing(net.towers)
    if compiled:
        compile_blocks(net.towers)
    model = fully_shard_model(net, [], torch.device("cpu")) if strategy == "fsdp" \
        else nn.parallel.DistributedDataParallel(net)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    n = global_batch // world
    g = torch.Generator().manual_seed(rank)
    tokens = {"input_ids": torch.randint(1, arch["vocab_size"], (n, length), generator=g),
              "attention_mask": torch.ones(n, length, dtype=torch.long)}
    batch = {"a": tokens, "b": {k: v.clone() for k, v in tokens.items()}, "labels": torch.arange(n) + rank * n}
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, net, optimizer, batch, lambda: torch.autocast("cpu", enabled=False))
        times.append(time.perf_counter() - start)
    peaks = [None] * world
    dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # GiB
    return {"peak_gib": max(peaks), "s_per_step": statistics.median(times[1:]),
            "params": sum(p.numel() for p in net.parameters()),  # (a sharded one's whole size)
            "trainable": sum(p.numel() for p in trainable)}


CONFIGURATIONS = (  # name, strategy, activation checkpointing, LoRA, train.compile
    ("DDP", "ddp", False, False, False),
    ("FSDP", "fsdp", False, False, False),
    ("FSDP + activation checkpointing", "fsdp", True, False, False),
    ("DDP + LoRA r=16 (q_proj, v_proj)", "ddp", False, True, False),
    ("FSDP + LoRA r=16 (q_proj, v_proj)", "fsdp", False, True, False),
    ("DDP + train.compile", "ddp", False, False, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", help="the configurations to run, their names separated by | (default: all)")
    args = parser.parse_args()
    heads = max(2, args.hidden // 64)
    arch = {"model_type": "qwen3", "vocab_size": 30522, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": heads, "num_key_value_heads": heads // 2, "head_dim": 64,
            "intermediate_size": 3 * args.hidden, "max_position_embeddings": 512}
    print(f"random Qwen3: {args.layers} layers, hidden {args.hidden}; {args.world} gloo ranks x 1 thread; global "
          f"batch {args.global_batch} pairs of {args.length} tokens; AdamW; {args.steps} steps")
    print(f"{'configuration':<38}{'parameters':>12}{'trainable':>12}{'peak GiB/worker':>17}{'s/step':>9}")
    for name, strategy, checkpointing, lora, compiled in CONFIGURATIONS:
        if args.only and name not in args.only.split("|"):
            continue
        r = run_on_local_ranks(_rank, args.world, strategy, arch, args.global_batch, args.length, args.steps,
                               checkpointing, lora, compiled, timeout=3600, start_method="spawn")
        print(f"{name:<38}{r['params'] / 1e6:>11.1f}M{r['trainable'] / 1e6:>11.2f}M{r['peak_gib']:>17.2f}"
              f"{r['s_per_step']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
