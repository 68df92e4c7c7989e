"""Supervised contrastive loss (Khosla et al. 2020), as pytorch-metric-learning's SupConLoss."""

from __future__ import annotations

import torch
from torch import Tensor

from distributed_cl.losses.core import (
    BatchLayout,
    GatheredLoss,
    as_labels,
    autocast_off,
    check_embeddings,
    masked_logits,
    multi_positive_row_losses,
    normalized_fp32,
)
from distributed_cl.losses.tiled import Logits, class_index, class_sums, positive_counts, row_logsumexp


class SupConLoss(GatheredLoss):
    """`loss(embeddings, labels)`: every same-label embedding in the global batch is a positive;
    the softmax runs over every other embedding. Mean over anchors that have a positive."""

    def __init__(self, temperature: float = 0.1, gather: bool = True, chunk_size: int | None = None) -> None:
        super().__init__(temperature, gather, chunk_size)

    @autocast_off
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_embeddings("embeddings", embeddings)
        labels = as_labels(labels, len(embeddings), embeddings.device)
        z = normalized_fp32(embeddings)
        layout = BatchLayout.exchange(len(z), z.device, self.gather)
        if self.chunk_size:
            return self._tiled(z, labels, layout)
        positives = labels[:, None] == layout.gather_labels(labels)[None, :]
        positives.diagonal(offset=layout.offset).fill_(False)
        logits = masked_logits(z / self.temperature, layout.gather(z), self_offset=layout.offset)
        losses, num_pos = multi_positive_row_losses(logits, positives, denominator="all")
        return self._finish_labelled(losses, num_pos, layout)

    def _tiled(self, z: Tensor, labels: Tensor, layout: BatchLayout) -> Tensor:
        # -mean_p log softmax_ip = lse_i - q_i . mean_p z_p: the positives' logits through their class sum
        z_all, labels_all = layout.gather(z), layout.gather_labels(labels)
        lse = row_logsumexp(z, z_all, self.chunk_size, Logits(1 / self.temperature, layout.offset))
        index = class_index(labels_all)
        own = index[layout.offset : layout.offset + len(z)]
        num_pos = positive_counts(index, layout.offset, len(z))
        sums = class_sums(z_all, index)
        positive_logits = (z * (sums[own] - z)).sum(1) / self.temperature  # the class sum less the anchor
        losses = torch.where(num_pos > 0, lse - positive_logits / num_pos.clamp(min=1), 0.0)
        return self._finish_labelled(losses, num_pos, layout)
