"""Pair-labelled data (x1[i], x2[i], is_same[i]): labels for SupCon/NT-Xent, and a margin loss."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from distributed_cl.losses.core import (
    BatchLayout,
    LossAndStats,
    LossStats,
    autocast_off,
    check_embeddings,
    check_same_length,
    normalized_fp32,
    returns_stats,
)
from distributed_cl.losses.labels import as_is_same, pair_labels  # noqa: F401 (pair_labels: public here too)
from distributed_cl.losses.options import LossOptions


class ContrastiveLoss(nn.Module):
    """Margin contrastive loss (Hadsell et al. 2006) for pairs, as sentence-transformers':
    0.5 * (y * d^2 + (1 - y) * max(0, margin - d)^2), mean over the global pairs.

    `distance` is "cosine" (1 - cos) or "euclidean" (between L2-normalised embeddings). Pairs
    need no gather; under torch.distributed each rank returns W/N times its sum, so DDP's mean
    gives the gradient of the global mean.
    """

    def __init__(self, margin: float = 0.5, distance: str = "cosine", gather: bool = True) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin!r}")
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
        self.margin, self.distance, self.gather = float(margin), distance, gather
        self.last_stats: LossStats | None = None  # the last call's (`returns_stats`)

    log_keys: tuple[str, ...] = ()  # no temperature: the margin is fixed

    def logged(self) -> dict[str, float]:
        return {}

    @returns_stats
    @autocast_off
    def forward(self, x1: Tensor, x2: Tensor, is_same) -> LossAndStats:
        check_embeddings("x1", x1)
        check_embeddings("x2", x2, dim=x1.shape[1])
        check_same_length("x1", x1, "x2", x2)
        y = as_is_same(is_same, len(x1), x1.device).float()
        a, b = normalized_fp32(x1), normalized_fp32(x2)
        if self.distance == "cosine":
            d = 1.0 - (a * b).sum(dim=1)
        else:  # clamp: the gradient of sqrt at 0 is infinite
            d = ((a - b).square().sum(dim=1)).clamp(min=1e-12).sqrt()
        losses = 0.5 * (y * d.square() + (1.0 - y) * F.relu(self.margin - d).square())
        layout = BatchLayout.exchange(len(x1), x1.device, self.gather)
        if layout.total == 0:
            raise ValueError("ContrastiveLoss got an empty global batch")
        stats = LossStats(anchors=layout.total, anchors_without_positive=0, mean_positives=1.0)  # anchors: the global pairs
        return losses.sum() * (layout.world / layout.total), stats


class ContrastiveOptions(LossOptions):
    """`loss.name: contrastive`: the margin loss on pair-labelled rows (dataset.columns.is_same):
    pulled together where is_same, pushed past the margin elsewhere."""

    name: Literal["contrastive"] = "contrastive"
    margin: float = 0.5
    distance: str = "cosine"  # cosine | euclidean (ContrastiveLoss checks it)
    rows: ClassVar[tuple[str, ...]] = ("is_same",)
    needs_is_same: ClassVar[bool] = True

    def build(self) -> ContrastiveLoss:
        return ContrastiveLoss(self.margin, self.distance)

    def __call__(self, loss_fn, z_a, z_b, labels, memory=None, negative=None, is_same=None):
        if is_same is None:
            raise ValueError("the margin loss trains on pair-labelled rows: the batch has no is_same")
        return loss_fn(z_a, z_b, is_same)
