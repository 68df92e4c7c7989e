"""Supervised contrastive loss (Khosla et al. 2020), as pytorch-metric-learning's SupConLoss."""

from __future__ import annotations

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


class SupConLoss(GatheredLoss):
    """`loss(embeddings, labels)`: every same-label embedding in the global batch is a positive;
    the softmax runs over every other embedding. Mean over anchors that have a positive."""

    def __init__(self, temperature: float = 0.1, gather: bool = True) -> None:
        super().__init__(temperature, gather)

    @autocast_off
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_embeddings("embeddings", embeddings)
        labels = as_labels(labels, len(embeddings), embeddings.device)
        z = normalized_fp32(embeddings)
        layout = BatchLayout.exchange(len(z), z.device, self.gather)
        positives = labels[:, None] == layout.gather_labels(labels)[None, :]
        positives.diagonal(offset=layout.offset).fill_(False)
        logits = masked_logits(z / self.temperature, layout.gather(z), self_offset=layout.offset)
        losses, num_pos = multi_positive_row_losses(logits, positives, denominator="all")
        return self._finish_labelled(losses, num_pos, layout)
