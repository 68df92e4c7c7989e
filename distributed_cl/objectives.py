"""The losses a config can name: one registry, OBJECTIVES.

Each entry says how to build the loss from the `loss` section (and which of its fields it reads),
how the loss consumes a task's paired embeddings and labels, and whether it needs class labels
(then every global batch holds m samples of each class it contains). The loss module itself says
what the console shows of it (`logged()`: its temperature or scale). `loss.name` is checked
against this registry, and the loop builds from it: a new loss is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distributed_cl.config import LossConfig
from distributed_cl.losses import ClipLoss, InfoNCELoss, NTXentLoss, SigLipLoss, SupConLoss
from distributed_cl.losses.core import Memory


def pair_views(loss_fn: nn.Module, z_a: Tensor, z_b: Tensor, labels: Tensor, memory: Memory | None = None) -> Tensor:
    """z_a[i] and z_b[i] are each other's positive (two views, a text pair, an image and its caption)."""
    return loss_fn(z_a, z_b, memory=memory)


def supervised_views(loss_fn: nn.Module, z_a: Tensor, z_b: Tensor, labels: Tensor,
                     memory: Memory | None = None) -> Tensor:
    """Both sides as one labelled set: positives are the embeddings of the same class."""
    return loss_fn(torch.cat([z_a, z_b]), torch.cat([labels, labels]), memory=memory)


@dataclass(frozen=True)
class Objective:
    build: Callable[[LossConfig], nn.Module]
    views: Callable[..., Tensor]  # (loss, z_a, z_b, labels, memory) -> the loss
    labelled: bool = False
    options: tuple[str, ...] = ()  # the `loss` fields it reads besides name, temperature and chunk_size


def _negatives(c: LossConfig) -> dict:
    return {"decoupled": c.decoupled, "hard_negative_beta": c.hard_negative_beta}


NEGATIVE_OPTIONS = ("decoupled", "hard_negative_beta")
QUEUE = ("queue_size",)  # the loss takes past keys as extra candidates (queue.py)

OBJECTIVES: dict[str, Objective] = {
    "ntxent": Objective(lambda c: NTXentLoss(c.temperature, chunk_size=c.chunk_size, **_negatives(c)), pair_views,
                        options=(*NEGATIVE_OPTIONS, *QUEUE)),
    "infonce": Objective(lambda c: InfoNCELoss(c.temperature, chunk_size=c.chunk_size, **_negatives(c)), pair_views,
                         options=(*NEGATIVE_OPTIONS, *QUEUE)),
    "clip": Objective(lambda c: ClipLoss(c.temperature, chunk_size=c.chunk_size), pair_views, options=QUEUE),
    "siglip": Objective(lambda c: SigLipLoss(c.init_scale, c.init_bias, c.chunk_size, c.neighbour_exchange),
                        pair_views, options=("init_scale", "init_bias", "neighbour_exchange")),
    "supcon": Objective(lambda c: SupConLoss(c.temperature, chunk_size=c.chunk_size), supervised_views,
                        labelled=True, options=QUEUE),
}


def build_objective(config: LossConfig) -> tuple[nn.Module, Callable]:
    """The loss module for `loss.name` and the function that feeds it (z_a, z_b, labels)."""
    if config.name not in OBJECTIVES:
        raise ValueError(f"loss.name: unknown loss {config.name!r} (known: {', '.join(OBJECTIVES)})")
    objective = OBJECTIVES[config.name]
    return objective.build(config), objective.views
