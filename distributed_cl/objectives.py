"""The losses a config can name: one registry, OBJECTIVES.

Each entry says how to build the loss from the `loss` section (and which of its fields it reads),
how the loss consumes a task's paired embeddings and labels, whether it needs class labels (then
every global batch holds m samples of each class it contains), and which per-row columns of your
data it can use: a hard negative per row, 0/1 pair labels. The loss module itself says
what the console shows of it (`logged()`: its temperature or scale). `loss.name` is checked
against this registry, and the loop builds from it: a new loss is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distributed_cl.config import LossConfig
from distributed_cl.losses import (
    ClipLoss,
    ContrastiveLoss,
    InfoNCELoss,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
    pair_labels,
)
from distributed_cl.losses.core import Memory


def pair_views(loss_fn: nn.Module, z_a: Tensor, z_b: Tensor, labels: Tensor, memory: Memory | None = None,
               negative: Tensor | None = None, is_same: Tensor | None = None) -> Tensor:
    """z_a[i] and z_b[i] are each other's positive (two views, a text pair, an image and its
    caption); with the rows' hard negatives, every query meets them too; with pair labels
    (NT-Xent), positives only where is_same."""
    if is_same is not None:
        return loss_fn(torch.cat([z_a, z_b]), labels=torch.cat(pair_labels(is_same)), memory=memory)
    if negative is not None:
        return loss_fn(z_a, z_b, memory=memory, hard_negatives=negative)
    return loss_fn(z_a, z_b, memory=memory)


def supervised_views(loss_fn: nn.Module, z_a: Tensor, z_b: Tensor, labels: Tensor, memory: Memory | None = None,
                     negative: Tensor | None = None, is_same: Tensor | None = None) -> Tensor:
    """Both sides as one labelled set: positives are the embeddings of the same class (with pair
    labels: the two sides of a matching row only)."""
    labels = torch.cat(pair_labels(is_same) if is_same is not None else [labels, labels])
    return loss_fn(torch.cat([z_a, z_b]), labels, memory=memory)


def margin_views(loss_fn: nn.Module, z_a: Tensor, z_b: Tensor, labels: Tensor, memory: Memory | None = None,
                 negative: Tensor | None = None, is_same: Tensor | None = None) -> Tensor:
    """Pair-labelled rows: pulled together where is_same, pushed past the margin elsewhere."""
    if is_same is None:
        raise ValueError("the margin loss trains on pair-labelled rows: the batch has no is_same")
    return loss_fn(z_a, z_b, is_same)


@dataclass(frozen=True)
class Objective:
    build: Callable[[LossConfig], nn.Module]
    views: Callable[..., Tensor]  # (loss, z_a, z_b, labels, memory, negative, is_same) -> the loss
    labelled: bool = False
    options: tuple[str, ...] = ()  # the `loss` fields it reads besides name, temperature and chunk_size
    rows: tuple[str, ...] = ()  # the per-row dataset columns it can use: "negative", "is_same"
    needs_is_same: bool = False  # it trains on pair-labelled rows only


def _negatives(c: LossConfig) -> dict:
    return {"decoupled": c.decoupled, "hard_negative_beta": c.hard_negative_beta}


NEGATIVE_OPTIONS = ("decoupled", "hard_negative_beta")
QUEUE = ("queue_size",)  # the loss takes past keys as extra candidates (queue.py)

OBJECTIVES: dict[str, Objective] = {
    "ntxent": Objective(lambda c: NTXentLoss(c.temperature, chunk_size=c.chunk_size, **_negatives(c)), pair_views,
                        options=(*NEGATIVE_OPTIONS, *QUEUE), rows=("is_same",)),
    "infonce": Objective(lambda c: InfoNCELoss(c.temperature, chunk_size=c.chunk_size, **_negatives(c)), pair_views,
                         options=(*NEGATIVE_OPTIONS, *QUEUE), rows=("negative",)),
    "clip": Objective(lambda c: ClipLoss(c.temperature, chunk_size=c.chunk_size), pair_views, options=QUEUE),
    "siglip": Objective(lambda c: SigLipLoss(c.init_scale, c.init_bias, c.chunk_size, c.neighbour_exchange),
                        pair_views, options=("init_scale", "init_bias", "neighbour_exchange")),
    "supcon": Objective(lambda c: SupConLoss(c.temperature, chunk_size=c.chunk_size), supervised_views,
                        labelled=True, options=QUEUE, rows=("is_same",)),
    "contrastive": Objective(lambda c: ContrastiveLoss(c.margin, c.distance), margin_views,
                             options=("margin", "distance"), rows=("is_same",), needs_is_same=True),
}


def build_objective(config: LossConfig) -> tuple[nn.Module, Callable]:
    """The loss module for `loss.name` and the function that feeds it (z_a, z_b, labels)."""
    if config.name not in OBJECTIVES:
        raise ValueError(f"loss.name: unknown loss {config.name!r} (known: {', '.join(OBJECTIVES)})")
    objective = OBJECTIVES[config.name]
    return objective.build(config), objective.views
