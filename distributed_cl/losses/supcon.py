"""Supervised contrastive loss (Khosla et al. 2020), as pytorch-metric-learning's SupConLoss."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from distributed_cl.losses.core import (
    BatchLayout,
    GatheredLoss,
    LossAndStats,
    Memory,
    as_labels,
    autocast_off,
    check_embeddings,
    masked_logits,
    multi_positive_row_losses,
    normalized_fp32,
    returns_stats,
    with_memory,
)
from distributed_cl.losses.labels import pair_labels
from distributed_cl.losses.options import LabelledOptions, SoftmaxOptions
from distributed_cl.losses.tiled import Logits, class_index, class_sums, positive_counts, row_logsumexp


class SupConLoss(GatheredLoss):
    """`loss(embeddings, labels)`: every same-label embedding in the global batch is a positive;
    the softmax runs over every other embedding. Mean over anchors that have a positive."""

    def __init__(self, temperature: float = 0.1, gather: bool = True, chunk_size: int | None = None) -> None:
        super().__init__(temperature, gather, chunk_size)

    @returns_stats
    @autocast_off
    def forward(self, embeddings: Tensor, labels: Tensor, *, memory: Memory | None = None) -> LossAndStats:
        """`memory`: past keys of both sides with their labels, extra candidates; same-label ones
        are positives (XBM, Wang et al. 2020)."""
        check_embeddings("embeddings", embeddings)
        labels = as_labels(labels, len(embeddings), embeddings.device)
        z = normalized_fp32(embeddings)
        layout = BatchLayout.exchange(len(z), z.device, self.gather)
        extra, extra_labels = memory.both() if memory is not None else (None, None)
        candidates = with_memory(layout.gather(z), extra)
        labels_all = layout.gather_labels(labels)
        if extra is not None:
            labels_all = torch.cat([labels_all, extra_labels.to(labels_all)])
        if self.chunk_size:
            return self._tiled(z, labels, candidates, labels_all, layout)
        positives = labels[:, None] == labels_all[None, :]
        positives.diagonal(offset=layout.offset).fill_(False)
        logits = masked_logits(z / self.temperature, candidates, self_offset=layout.offset)
        losses, num_pos = multi_positive_row_losses(logits, positives, denominator="all")
        return self._finish_labelled(losses, num_pos, layout)

    def _tiled(self, z: Tensor, labels: Tensor, candidates: Tensor, labels_all: Tensor, layout: BatchLayout) -> LossAndStats:
        # -mean_p log softmax_ip = lse_i - q_i . mean_p z_p: the positives' logits through their class sum
        lse = row_logsumexp(z, candidates, self.chunk_size, Logits(1 / self.temperature, layout.offset))
        index = class_index(labels_all)
        own = index[layout.offset : layout.offset + len(z)]
        num_pos = positive_counts(index, layout.offset, len(z))
        sums = class_sums(candidates, index)
        positive_logits = (z * (sums[own] - z)).sum(1) / self.temperature  # the class sum less the anchor
        losses = torch.where(num_pos > 0, lse - positive_logits / num_pos.clamp(min=1), 0.0)
        return self._finish_labelled(losses, num_pos, layout)


class SupConOptions(SoftmaxOptions, LabelledOptions):
    """`loss.name: supcon`: both sides as one labelled set; positives share a class (with pair
    labels: the two sides of a matching row only)."""

    name: Literal["supcon"] = "supcon"
    labelled: ClassVar[bool] = True
    rows: ClassVar[tuple[str, ...]] = ("is_same",)

    def build(self) -> SupConLoss:
        return SupConLoss(self.temperature, chunk_size=self.chunk_size)

    def __call__(self, loss_fn, z_a, z_b, labels, memory=None, negative=None, is_same=None):
        labels = torch.cat(pair_labels(is_same) if is_same is not None else [labels, labels])
        return loss_fn(torch.cat([z_a, z_b]), labels, memory=memory)
