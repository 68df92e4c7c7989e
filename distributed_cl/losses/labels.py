"""Pair labels: 0/1 per pair (x1[i], x2[i] match or not) turned into class ids."""

from __future__ import annotations

import torch
from torch import Tensor

from distributed_cl.losses.core import BatchLayout


def as_is_same(is_same, n: int, device: torch.device) -> Tensor:
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
    is_same = as_is_same(is_same, len(is_same), is_same.device)
    layout = BatchLayout.exchange(len(is_same), is_same.device, gather)
    ids = layout.offset + torch.arange(len(is_same), device=is_same.device)
    return ids, torch.where(is_same, ids, ids + layout.total)
