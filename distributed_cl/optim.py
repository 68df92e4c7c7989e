"""Optimizers a config can name (OPTIMIZERS, checked by `optim.name`) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from distributed_cl.config import OptimConfig

OPTIMIZERS: dict[str, Callable[[OptimConfig, Iterable], torch.optim.Optimizer]] = {
    "adamw": lambda c, params: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda c, params: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
}


def build_optimizer(config: OptimConfig, params: Iterable) -> torch.optim.Optimizer:
    return OPTIMIZERS[config.name](config, params)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base learning rate, then cosine decay to zero at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
