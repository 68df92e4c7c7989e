"""The losses a config can name, and how each consumes a task's paired embeddings and labels.

One registry, OBJECTIVES: `loss.name` is checked against it, the loop builds from it, and
`labelled` says whether the loss needs class labels (then every global batch holds m samples of
each class it contains). A new loss is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distributed_cl.config import LossConfig
from distributed_cl.losses import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss


def pair_views(loss_fn: nn.Module, z_a: Tensor, z_b: Tensor, labels: Tensor) -> Tensor:
    """z_a[i] and z_b[i] are each other's positive (two views, a text pair, an image and its caption)."""
    return loss_fn(z_a, z_b)


def supervised_views(loss_fn: nn.Module, z_a: Tensor, z_b: Tensor, labels: Tensor) -> Tensor:
    """Both sides as one labelled set: positives are the embeddings of the same class."""
    return loss_fn(torch.cat([z_a, z_b]), torch.cat([labels, labels]))


@dataclass(frozen=True)
class Objective:
    loss: Callable[..., nn.Module]  # (temperature, chunk_size=...) -> loss module
    views: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
    labelled: bool = False


OBJECTIVES: dict[str, Objective] = {
    "ntxent": Objective(NTXentLoss, pair_views),
    "infonce": Objective(InfoNCELoss, pair_views),
    "clip": Objective(ClipLoss, pair_views),
    "supcon": Objective(SupConLoss, supervised_views, labelled=True),
}


def build_objective(config: LossConfig) -> tuple[nn.Module, Callable]:
    """The loss module for `loss.name` and the function that feeds it (z_a, z_b, labels)."""
    if config.name not in OBJECTIVES:
        raise ValueError(f"loss.name: unknown loss {config.name!r} (known: {', '.join(OBJECTIVES)})")
    objective = OBJECTIVES[config.name]
    return objective.loss(config.temperature, chunk_size=config.chunk_size), objective.views
