"""NT-Xent (SimCLR): lightly's NTXentLoss, with labels as pytorch-metric-learning's."""

from __future__ import annotations

import torch
from torch import Tensor

from distributed_cl.losses.core import (
    BatchLayout,
    GatheredLoss,
    as_labels,
    autocast_off,
    check_embeddings,
    check_same_length,
    masked_logits,
    multi_positive_row_losses,
    normalized_fp32,
)
from distributed_cl.losses.fused import RowCrossEntropy
from distributed_cl.losses.tiled import Logits, class_index, positive_counts, positive_softplus_sum, row_logsumexp


class NTXentLoss(GatheredLoss):
    """Normalized temperature-scaled cross entropy over the global batch.

    - `loss(view_a, view_b)`: SimCLR. Each of the 2N embeddings is an anchor whose positive is
      its other view; every other embedding in the global batch is a negative. Same value as
      lightly's `NTXentLoss(temperature, gather_distributed=True)`.
    - `loss(view_a, view_b, labels=y)`: also treats same-label embeddings as positives.
    - `loss(embeddings, labels=y)`: one set of embeddings, positives share a label.
    With labels, each positive pair competes with the anchor's negatives only (as in
    pytorch-metric-learning); per-anchor means are averaged over anchors that have a positive.
    """

    def __init__(self, temperature: float = 0.1, gather: bool = True, chunk_size: int | None = None) -> None:
        super().__init__(temperature, gather, chunk_size)

    @autocast_off
    def forward(self, view_a: Tensor, view_b: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        check_embeddings("view_a", view_a)
        if view_b is None:
            if labels is None:
                raise ValueError("NTXentLoss needs view_b, labels, or both")
            return self._labelled(normalized_fp32(view_a), as_labels(labels, len(view_a), view_a.device))
        check_embeddings("view_b", view_b, dim=view_a.shape[1])
        check_same_length("view_a", view_a, "view_b", view_b)
        z = normalized_fp32(torch.cat([view_a, view_b]))
        if labels is not None:
            labels = as_labels(labels, len(view_a), view_a.device)
            return self._labelled(z, torch.cat([labels, labels]), views=2)

        n = view_a.shape[0]
        layout = BatchLayout.exchange(n, view_a.device, self.gather).scaled(2)
        z_all = layout.gather(z)  # rank order: [a_0; b_0; a_1; b_1; ...]
        offset = layout.offset
        if self.chunk_size:  # a_i . b_i / T is both a_i's and b_i's positive logit
            lse = row_logsumexp(z, z_all, self.chunk_size, Logits(1 / self.temperature, offset))
            loss_sum = lse.sum() - 2 * (z[:n] * z[n:]).sum() / self.temperature
        else:
            local = torch.arange(n, device=z.device)
            targets = offset + torch.cat([local + n, local])  # a_i <-> b_i
            loss_sum = RowCrossEntropy.apply(z / self.temperature, z_all, targets, offset)
        return self._finish_single_positive(loss_sum, layout)

    def _labelled(self, z: Tensor, labels: Tensor, views: int = 1) -> Tensor:
        # Two views share their sample's label, so a_i and b_i are positives of each other.
        layout = BatchLayout.exchange(z.shape[0] // views, z.device, self.gather).scaled(views)
        if self.chunk_size:
            return self._labelled_tiled(z, labels, layout)
        positives = labels[:, None] == layout.gather_labels(labels)[None, :]
        positives.diagonal(offset=layout.offset).fill_(False)
        logits = masked_logits(z / self.temperature, layout.gather(z), self_offset=layout.offset)
        losses, num_pos = multi_positive_row_losses(logits, positives, denominator="negatives")
        return self._finish_labelled(losses, num_pos, layout)

    def _labelled_tiled(self, z: Tensor, labels: Tensor, layout: BatchLayout) -> Tensor:
        labels_all, z_all = layout.gather_labels(labels), layout.gather(z)
        num_pos = positive_counts(class_index(labels_all), layout.offset, len(z))
        negatives_only = Logits(1 / self.temperature, layout.offset, labels, labels_all)  # self, same label left out
        lse_neg = row_logsumexp(z, z_all, self.chunk_size, negatives_only)
        pair_sum = positive_softplus_sum(z, z_all, lse_neg, negatives_only, self.chunk_size)
        return self._finish_labelled(pair_sum / num_pos.clamp(min=1), num_pos, layout)
