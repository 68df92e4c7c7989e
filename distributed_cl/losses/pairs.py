"""Pair-labelled data (x1[i], x2[i], is_same[i]): labels for SupCon/NT-Xent, and a margin loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distributed_cl.losses.core import (
    BatchLayout,
    LossStats,
    autocast_off,
    check_embeddings,
    check_same_length,
    normalized_fp32,
)


def _as_is_same(is_same, n: int, device: torch.device) -> Tensor:
    is_same = torch.as_tensor(is_same, device=device)
    if is_same.dim() != 1 or is_same.shape[0] != n:
        raise ValueError(f"is_same must have shape ({n},), got shape {tuple(is_same.shape)}")
    if is_same.is_floating_point() or not bool(((is_same == 0) | (is_same == 1)).all()):
        raise ValueError("is_same must hold booleans or 0/1 integers")
    return is_same.bool()


def pair_labels(is_same, gather: bool = True) -> tuple[Tensor, Tensor]:
    """Class ids for x1 and x2 so that x1[i] and x2[i] are positives exactly where is_same[i].

    Ids are unique across ranks (each pair's id is its global index), so under
    torch.distributed pairs on different ranks never collide. Use with
    `SupConLoss()(torch.cat([x1, x2]), torch.cat(pair_labels(is_same)))` (or NTXentLoss).
    Anchors of a non-matching pair have no positive and serve only as negatives.
    """
    is_same = torch.as_tensor(is_same)
    is_same = _as_is_same(is_same, len(is_same), is_same.device)
    layout = BatchLayout.exchange(len(is_same), is_same.device, gather)
    ids = layout.offset + torch.arange(len(is_same), device=is_same.device)
    return ids, torch.where(is_same, ids, ids + layout.total)


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
        self.last_stats: LossStats | None = None  # anchors: the global pairs; none lacks its target
        self.empty_batches = 0

    def logged(self) -> dict[str, float]:
        return {}  # no temperature: the margin is fixed

    @autocast_off
    def forward(self, x1: Tensor, x2: Tensor, is_same) -> Tensor:
        check_embeddings("x1", x1)
        check_embeddings("x2", x2, dim=x1.shape[1])
        check_same_length("x1", x1, "x2", x2)
        y = _as_is_same(is_same, len(x1), x1.device).float()
        a, b = normalized_fp32(x1), normalized_fp32(x2)
        if self.distance == "cosine":
            d = 1.0 - (a * b).sum(dim=1)
        else:  # clamp: the gradient of sqrt at 0 is infinite
            d = ((a - b).square().sum(dim=1)).clamp(min=1e-12).sqrt()
        losses = 0.5 * (y * d.square() + (1.0 - y) * F.relu(self.margin - d).square())
        layout = BatchLayout.exchange(len(x1), x1.device, self.gather)
        if layout.total == 0:
            raise ValueError("ContrastiveLoss got an empty global batch")
        self.last_stats = LossStats(anchors=layout.total, anchors_without_positive=0, mean_positives=1.0)
        return losses.sum() * (layout.world / layout.total)
