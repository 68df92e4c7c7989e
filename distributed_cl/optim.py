"""Optimizers a config can name (OPTIMIZERS, by `optim.name`, each with its options), their parameter groups
(no weight decay on biases, norms, embeddings and scales; per-tower learning-rate multipliers),
and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distributed_cl.options import Options


class OptimOptions(Options):
    """The `optim` section: what every optimizer takes, and the schedule."""

    name: str
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(5.0, ge=0)  # max global grad norm; 0 disables

    def build(self, params: Iterable) -> torch.optim.Optimizer:
        """`params`: tensors, or the groups of `param_groups` (each with its own lr and weight decay)."""
        raise NotImplementedError


class AdamWOptions(OptimOptions):
    name: Literal["adamw"] = "adamw"

    def build(self, params: Iterable) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class SGDOptions(OptimOptions):
    name: Literal["sgd"] = "sgd"
    momentum: float = Field(0.9, ge=0)

    def build(self, params: Iterable) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


OPTIMIZERS: dict[str, type[OptimOptions]] = {"adamw": AdamWOptions, "sgd": SGDOptions}


def no_weight_decay(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """Biases, norm weights, scalars (logit_scale), embeddings (token and position tables, learnt
    position parameters; not a patch-embedding convolution): decaying them toward zero only hurts
    (the fine-tuning recipes of open_clip and timm exclude them the same way)."""
    return param.ndim < 2 or isinstance(module, nn.Embedding) or "embedding" in name.rsplit(".", 1)[-1]


def param_groups(model: nn.Module, config: OptimOptions, lr_mults: list[tuple[list[nn.Parameter], float]] = ()) -> list[dict]:
    """The trainable parameters in optimizer groups by (weight decay or none, learning-rate
    multiplier): `lr_mults` gives towers' parameters their multiplier (1 for the rest)."""
    mult = {id(p): m for params, m in lr_mults for p in params}
    owner = {id(p): module for module in model.modules() for p in module.parameters(recurse=False)}
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p, owner[id(p)])
        m = mult.get(id(p), 1.0)
        group = groups.setdefault((decay, m), {"params": [], "lr": config.lr * m, "lr_mult": m,
                                               "weight_decay": config.weight_decay if decay else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1] != 1.0, not k[0]))]  # a full-rate group first


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base learning rate, then cosine decay to zero at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
