"""NT-Xent (SimCLR): lightly's NTXentLoss, with labels as pytorch-metric-learning's."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from distributed_cl.losses.core import (
    MASKED,
    BatchLayout,
    GatheredLoss,
    LossAndStats,
    Memory,
    anchor_losses,
    as_labels,
    autocast_off,
    check_embeddings,
    check_negative_options,
    check_same_length,
    logits_of,
    masked_logits,
    multi_positive_row_losses,
    negative_log_mass,
    negative_options_repr,
    normalized_fp32,
    returns_stats,
    with_memory,
)
from distributed_cl.losses.fused import RowCrossEntropy
from distributed_cl.losses.options import NegativeWeighting, SoftmaxOptions
from distributed_cl.losses.tiled import (
    Logits,
    class_index,
    class_sums,
    positive_counts,
    positive_softplus_sum,
    row_logsumexp,
)


class NTXentLoss(GatheredLoss):
    """Normalized temperature-scaled cross entropy over the global batch.

    - `loss(view_a, view_b)`: SimCLR. Each of the 2N embeddings is an anchor whose positive is
      its other view; every other embedding in the global batch is a negative. Same value as
      lightly's `NTXentLoss(temperature, gather_distributed=True)`.
    - `loss(view_a, view_b, labels=y)`: also treats same-label embeddings as positives.
    - `loss(embeddings, labels=y)`: one set of embeddings, positives share a label.
    With labels, each positive pair competes with the anchor's negatives only (as in
    pytorch-metric-learning); per-anchor means are averaged over anchors that have a positive.

    `decoupled=True` leaves the positive out of the denominator (DCL, Yeh et al. 2022: lightly's
    DCLLoss); `hard_negative_beta` > 0 weights each negative by e^(beta * logit), normalised to
    mean 1 (HCL, Robinson et al. 2021, without its debiasing term). Both keep the gathered,
    tiled and exact behaviour of the plain loss.
    """

    def __init__(self, temperature: float = 0.1, gather: bool = True, chunk_size: int | None = None,
                 decoupled: bool = False, hard_negative_beta: float = 0.0) -> None:
        super().__init__(temperature, gather, chunk_size)
        self.decoupled, self.hard_negative_beta = check_negative_options(decoupled, hard_negative_beta)

    @property
    def plain(self) -> bool:
        return not self.decoupled and self.hard_negative_beta == 0

    def extra_repr(self) -> str:
        return super().extra_repr() + negative_options_repr(self)

    @returns_stats
    @autocast_off
    def forward(self, view_a: Tensor, view_b: Tensor | None = None, labels: Tensor | None = None, *,
                memory: Memory | None = None) -> LossAndStats:
        """`memory`: past keys of both sides, extra negatives for every anchor (with labels, the
        same-label ones are positives: XBM)."""
        check_embeddings("view_a", view_a)
        extra, extra_labels = memory.both() if memory is not None else (None, None)
        if view_b is None:
            if labels is None:
                raise ValueError("NTXentLoss needs view_b, labels, or both")
            labels = as_labels(labels, len(view_a), view_a.device)
            return self._labelled(normalized_fp32(view_a), labels, 1, extra, extra_labels)
        check_embeddings("view_b", view_b, dim=view_a.shape[1])
        check_same_length("view_a", view_a, "view_b", view_b)
        z = normalized_fp32(torch.cat([view_a, view_b]))
        if labels is not None:
            labels = as_labels(labels, len(view_a), view_a.device)
            return self._labelled(z, torch.cat([labels, labels]), 2, extra, extra_labels)

        n = view_a.shape[0]
        layout = BatchLayout.exchange(n, view_a.device, self.gather).scaled(2)
        candidates = with_memory(layout.gather(z), extra)  # rank order: [a_0; b_0; a_1; b_1; ...], then memory
        offset = layout.offset
        if not self.plain:
            return self._finish_single_positive(self._reweighted(z, candidates, layout), layout)
        if self.chunk_size:  # a_i . b_i / T is both a_i's and b_i's positive logit
            lse = row_logsumexp(z, candidates, self.chunk_size, Logits(1 / self.temperature, offset))
            loss_sum = lse.sum() - 2 * (z[:n] * z[n:]).sum() / self.temperature
        else:
            local = torch.arange(n, device=z.device)
            targets = offset + torch.cat([local + n, local])  # a_i <-> b_i
            loss_sum = RowCrossEntropy.apply(z / self.temperature, candidates, targets, offset)
        return self._finish_single_positive(loss_sum, layout)

    def _reweighted(self, z: Tensor, candidates: Tensor, layout: BatchLayout) -> Tensor:
        """Sum of the anchors' decoupled / hard-negative-weighted losses; the negatives of a_i
        and b_i are every other sample's views and the memory (sample ids tell them apart, also
        in tiles: the memory's are negative)."""
        n, t = len(z) // 2, self.temperature
        sample = torch.arange(n, device=z.device).repeat(2) + layout.offset // 2
        in_memory = len(candidates) - layout.total
        samples_all = torch.cat([layout.gather_labels(sample), -1 - torch.arange(in_memory, device=z.device)])
        positive = (z[:n] * z[n:]).sum(1).repeat(2) / t
        if self.chunk_size:
            def lse(c: float) -> Tensor:
                return row_logsumexp(z, candidates, self.chunk_size, Logits(c / t, layout.offset, sample, samples_all))
        else:
            logits = logits_of(z, candidates) / t
            others = sample[:, None] != samples_all[None, :]

            def lse(c: float) -> Tensor:
                return torch.logsumexp((logits * c).masked_fill(~others, MASKED), dim=1)
        log_mass = negative_log_mass(lse, len(candidates) - 2, self.hard_negative_beta)
        return anchor_losses(positive, log_mass, self.decoupled).sum()

    def _labelled(self, z: Tensor, labels: Tensor, views: int, extra: Tensor | None, extra_labels: Tensor | None) -> LossAndStats:
        # Two views share their sample's label, so a_i and b_i are positives of each other.
        layout = BatchLayout.exchange(z.shape[0] // views, z.device, self.gather).scaled(views)
        candidates = with_memory(layout.gather(z), extra)
        labels_all = layout.gather_labels(labels)
        if extra is not None:
            labels_all = torch.cat([labels_all, extra_labels.to(labels_all)])
        if self.chunk_size:
            return self._labelled_tiled(z, labels, candidates, labels_all, layout)
        positives = labels[:, None] == labels_all[None, :]
        positives.diagonal(offset=layout.offset).fill_(False)
        logits = masked_logits(z / self.temperature, candidates, self_offset=layout.offset)
        if self.plain:
            losses, num_pos = multi_positive_row_losses(logits, positives, denominator="negatives")
            return self._finish_labelled(losses, num_pos, layout)
        negatives = ~positives
        negatives.diagonal(offset=layout.offset).fill_(False)

        def lse(c: float) -> Tensor:
            return torch.logsumexp((logits * c).masked_fill(~negatives, MASKED), dim=1)
        log_mass = negative_log_mass(lse, negatives.sum(1), self.hard_negative_beta)
        num_pos = positives.sum(1)
        pair_losses = anchor_losses(logits, log_mass[:, None], self.decoupled)
        losses = torch.where(positives, pair_losses, 0.0).sum(1) / num_pos.clamp(min=1)
        return self._finish_labelled(losses, num_pos, layout)

    def _labelled_tiled(self, z: Tensor, labels: Tensor, candidates: Tensor, labels_all: Tensor,
                        layout: BatchLayout) -> LossAndStats:
        t = self.temperature
        index = class_index(labels_all)
        num_pos = positive_counts(index, layout.offset, len(z))

        def lse(c: float) -> Tensor:  # self and the same label left out: the negatives
            return row_logsumexp(z, candidates, self.chunk_size, Logits(c / t, layout.offset, labels, labels_all))
        log_mass = negative_log_mass(lse, len(candidates) - 1 - num_pos, self.hard_negative_beta)
        if self.decoupled:  # sum_p (log_mass - l_p): the positives' logits through their class sum
            own = index[layout.offset : layout.offset + len(z)]
            positive_sum = (z * (class_sums(candidates, index)[own] - z)).sum(1) / t
            pair_sum = torch.where(num_pos > 0, num_pos * log_mass - positive_sum, 0.0)
        else:
            spec = Logits(1 / t, layout.offset, labels, labels_all)
            pair_sum = positive_softplus_sum(z, candidates, log_mass, spec, self.chunk_size)
        return self._finish_labelled(pair_sum / num_pos.clamp(min=1), num_pos, layout)


class NTXentOptions(SoftmaxOptions, NegativeWeighting):
    """`loss.name: ntxent`: two views of each row (or a text pair), labelled through pair labels."""

    name: Literal["ntxent"] = "ntxent"
    rows: ClassVar[tuple[str, ...]] = ("is_same",)

    def build(self) -> NTXentLoss:
        return NTXentLoss(self.temperature, chunk_size=self.chunk_size, decoupled=self.decoupled,
                          hard_negative_beta=self.hard_negative_beta)
