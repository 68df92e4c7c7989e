"""How the model is spread over the workers (`train.strategy`), and what each way needs.

ddp: every worker holds the whole model; DDP averages the gradients in the backward.
fsdp: FSDP2 (`fully_shard`) shards each repeated block of the towers (a transformer layer, as a
transformers model's `_no_split_modules` names it) and, as the root unit, the rest of the model
over the workers: a worker holds 1/W of the weights, gradients and optimizer state, and gathers
one block's weights at a time in the forward and backward. The gradients are the same as DDP's:
the reduce-scatter averages them over the workers as DDP's all-reduce does. The loss's own
parameters (a learnt temperature, a pretrained CLIP's logit scale) stay whole on every worker,
outside the shards (`ignored_params`), and are averaged here after the backward.

Every worker must run the same passes through a sharded block (each gathers the block's weights
from all of them): gradient caching cuts every rank's batch into the same number of chunks
(grad_cache.py); evaluation and exports run on a whole copy of the towers (`full_state_dict`).
Checkpoints are sharded (torch.distributed.checkpoint): each worker writes its own shard, and a
run resumes from them on any number of workers.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distributed_cl import distributed as dist_utils

Strategy = Literal["ddp", "fsdp"]
SHARDS_DIR = "shards"  # a sharded checkpoint's torch.distributed.checkpoint directory


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of `model` that FSDP shards one by one: the modules whose class a
    transformers model inside names in `_no_split_modules` (its decoder or encoder layers), else
    the members of every ModuleList of two or more modules of one class (open_clip's resblocks)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) and len(lst) > 1
            and len({type(x) for x in lst}) == 1 for m in lst]


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards any of `model`'s parameters."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def check_shardable(towers: nn.Module, where: str = "train.strategy") -> None:
    """An error, unless `towers` have blocks to shard (a CNN, or a model of one block, does not:
    train it with ddp)."""
    if not shard_blocks(towers):
        raise ValueError(f"{where}=fsdp: the towers ({type(towers).__name__}) have no repeated transformer blocks to "
                         "shard over the workers; they are small enough to train whole on each: use train.strategy=ddp")


def activation_checkpointing(model: nn.Module) -> None:
    """Each block's activations recomputed in the backward instead of kept (non-reentrant
    checkpointing, the RNG state restored: the same dropout masks, the same gradients)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    blocks = {id(m) for m in shard_blocks(model)}
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in blocks)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile on each repeated block in place (one graph a block, reused by all of them:
    a short compile), or on the whole model where it has none; dynamic shapes, as the batch's
    text lengths and gradient caching's chunks vary. The weights' names stay the same."""
    blocks = shard_blocks(model) or [model]
    for block in blocks:
        block.compile(dynamic=True)


def fully_shard_model(model: nn.Module, replicated: list[nn.Parameter], device: torch.device) -> nn.Module:
    """`model` sharded in place over the default process group: each block, each embedding table
    outside them (a large vocabulary's), then the rest as the root; `replicated` stay whole (and
    where they are). Built on the CPU, each unit goes to the process group's device as it is
    sharded, so the GPU never holds the whole model. On a GPU the weights are gathered in bf16
    and the gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_shardable(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    ignored = set(replicated)
    blocks = shard_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()}
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in inside]
    for unit in (*blocks, *tables):
        fully_shard(unit, mp_policy=policy, ignored_params=ignored)
    return fully_shard(model, mp_policy=policy, ignored_params=ignored)


def average_replicated_grads(model: nn.Module) -> None:
    """The mean over the workers of the gradients of the parameters FSDP leaves whole (DDP's
    mean for them); nothing without FSDP."""
    from torch.distributed.tensor import DTensor

    if dist_utils.get_world_size() == 1 or not is_sharded(model):
        return
    for p in model.parameters():
        if p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients so that their global norm is at most `max_norm`, whole or sharded:
    a sharded gradient's squares are summed over the workers' shards, a whole one counted once."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    sharded = sum((g.to_local().float().pow(2).sum() for g in grads if isinstance(g, DTensor)), torch.zeros(()))
    whole = sum((g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)), torch.zeros(()))
    device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    total = (dist_utils.all_reduce_sum(sharded.to(device)) + whole.to(device)).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    factor = float(scale)
    for g in grads:
        g.mul_(factor)
    return total


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model`'s state dict with every sharded tensor gathered whole (a collective: every worker
    calls it), for a whole copy (evaluation, exports)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}


def _trainable():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_shards(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """This worker's shard of the trained weights (frozen ones, such as LoRA's base model, are
    rebuilt from the config) and the optimizer state, under `directory`/shards
    (every worker calls it, each with its own directory: Ray Train merges them into one checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_trainable())
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=os.path.join(directory, SHARDS_DIR))


def load_shards(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The weights and optimizer state `save_shards` wrote, resharded over this run's workers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_trainable())
    state = {"model": weights, "optimizer": optim}
    dcp.load(state, checkpoint_id=os.path.join(directory, SHARDS_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_trainable())
