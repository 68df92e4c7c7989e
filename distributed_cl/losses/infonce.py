"""InfoNCE with in-batch, unpaired or paired negatives, as info-nce-pytorch's InfoNCE."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distributed_cl.losses.core import (
    MASKED,
    BatchLayout,
    GatheredLoss,
    LossAndStats,
    Memory,
    anchor_losses,
    autocast_off,
    check_embeddings,
    check_negative_options,
    check_same_length,
    logits_of,
    masked_logits,
    negative_log_mass,
    negative_options_repr,
    normalized_fp32,
    returns_stats,
    with_memory,
)
from distributed_cl.losses.fused import RowCrossEntropy
from distributed_cl.losses.options import NegativeWeighting, SoftmaxOptions
from distributed_cl.losses.tiled import Logits, row_logsumexp


class InfoNCELoss(GatheredLoss):
    """`loss(query, positive_key, negative_keys=None)`, one direction (query -> keys).

    - negative_keys=None: the other queries' positive keys (gathered from every rank) are the
      negatives.
    - negative_mode="unpaired", negative_keys (m, d): one shared pool, gathered from every rank.
    - negative_mode="paired", negative_keys (n, m, d): each query's own negatives; no gather.

    `decoupled` and `hard_negative_beta` change the denominator as NTXentLoss's do (DCL, HCL).
    """

    def __init__(self, temperature: float = 0.1, negative_mode: str = "unpaired", gather: bool = True,
                 chunk_size: int | None = None, decoupled: bool = False, hard_negative_beta: float = 0.0) -> None:
        super().__init__(temperature, gather, chunk_size)
        if negative_mode not in ("unpaired", "paired"):
            raise ValueError(f"negative_mode must be 'unpaired' or 'paired', got {negative_mode!r}")
        self.negative_mode = negative_mode
        self.decoupled, self.hard_negative_beta = check_negative_options(decoupled, hard_negative_beta)

    def extra_repr(self) -> str:
        return super().extra_repr() + negative_options_repr(self)

    @returns_stats
    @autocast_off
    def forward(self, query: Tensor, positive_key: Tensor, negative_keys: Tensor | None = None, *,
                memory: Memory | None = None, hard_negatives: Tensor | None = None) -> LossAndStats:
        """`memory`: past positive keys (its side b), extra negatives for every query (MoCo's queue).
        `hard_negatives` (n, h, d), or (n, d) for h = 1: h hard negative keys per query, gathered
        with the positive keys, so that every query meets every row's positive and all its hard
        negatives (sentence-transformers' MultipleNegativesRankingLoss with hard negatives)."""
        check_embeddings("query", query)
        check_embeddings("positive_key", positive_key, dim=query.shape[1])
        check_same_length("query", query, "positive_key", positive_key)
        q = normalized_fp32(query) / self.temperature
        k = normalized_fp32(positive_key)
        layout = BatchLayout.exchange(len(q), q.device, self.gather)

        plain = not self.decoupled and self.hard_negative_beta == 0
        extra = None if memory is None else memory.b
        pos_logit = (q * k).sum(dim=1)
        if negative_keys is None:  # every query's positive (and hard negative), gathered, then the memory's keys
            keys = with_memory(self._in_batch_keys(query, k, hard_negatives, layout), extra)
            if plain:
                if self.chunk_size:
                    loss_sum = row_logsumexp(q, keys, self.chunk_size).sum() - pos_logit.sum()
                else:
                    targets = layout.offset + torch.arange(len(q), device=q.device)
                    loss_sum = RowCrossEntropy.apply(q, keys, targets, None)
                return self._finish_single_positive(loss_sum, layout)
            lse, count = self._in_batch_lse(q, keys, layout), len(keys) - 1
        else:
            if hard_negatives is not None:
                raise ValueError("InfoNCELoss takes negative_keys or hard_negatives, not both")
            lse, count = self._negative_lse(q, negative_keys)
            if extra is not None and len(extra):  # the memory's keys join each query's negatives
                lse_given, lse_memory = lse, self._pool_lse(q, normalized_fp32(extra))
                lse, count = (lambda c: torch.logaddexp(lse_given(c), lse_memory(c))), count + len(extra)
        # -log(e^pos / (e^pos + Ng)) (or / Ng, decoupled), without materialising [pos, negs]
        log_mass = negative_log_mass(lse, count, self.hard_negative_beta)
        return self._finish_single_positive(anchor_losses(pos_logit, log_mass, self.decoupled).sum(), layout)

    @staticmethod
    def _in_batch_keys(query: Tensor, k: Tensor, hard_negatives: Tensor | None, layout: BatchLayout) -> Tensor:
        """Every rank's positive keys, then every rank's hard negatives, h a row (positives stay
        first). The negatives travel as one (n, h * d) row each: the gather's row layout is the
        positives'."""
        if hard_negatives is None:
            return layout.gather(k)
        if hard_negatives.dim() == 2:
            hard_negatives = hard_negatives.unsqueeze(1)
        if hard_negatives.dim() != 3:
            raise ValueError(f"hard_negatives must have shape (batch, dim) or (batch, h, dim), got shape "
                             f"{tuple(hard_negatives.shape)}")
        check_same_length("query", query, "hard_negatives", hard_negatives)
        n, h, d = hard_negatives.shape
        check_embeddings("hard_negatives", hard_negatives.reshape(n * h, d), dim=query.shape[1])
        negatives = normalized_fp32(hard_negatives.reshape(n * h, d)).view(n, h * d)
        return torch.cat([layout.gather(k), layout.gather(negatives).view(-1, d)])

    def _in_batch_lse(self, q: Tensor, k_all: Tensor, layout: BatchLayout) -> Callable[[float], Tensor]:
        """lse(c) over every gathered key but the query's own positive."""
        rows = layout.offset + torch.arange(len(q), device=q.device)
        if self.chunk_size:
            columns = torch.arange(len(k_all), device=q.device)
            return lambda c: row_logsumexp(q, k_all, self.chunk_size, Logits(c, None, rows, columns))
        logits = masked_logits(q, k_all, self_offset=layout.offset)  # the positive sits where "self" would
        return lambda c: torch.logsumexp((logits * c).masked_fill(logits == MASKED, MASKED), dim=1)

    def _negative_lse(self, q: Tensor, negative_keys: Tensor) -> tuple[Callable[[float], Tensor], int]:
        """lse(c): each query's log-sum-exp over c times its negatives' logits, and how many
        negatives it has. Paired negatives need no tiles: their (n x m) logits are a d-th of the
        (n x m x d) keys already in memory."""
        if self.negative_mode == "paired":
            if negative_keys.dim() != 3 or negative_keys.shape[0] != len(q) or negative_keys.shape[2] != q.shape[1]:
                raise ValueError(
                    f"paired negative_keys must have shape ({len(q)}, m, {q.shape[1]}), "
                    f"got {tuple(negative_keys.shape)}"
                )
            check_embeddings("negative_keys", negative_keys.flatten(0, 1))
            logits = torch.einsum("nd,nmd->nm", q, F.normalize(negative_keys.float(), dim=2))
            return lambda c: torch.logsumexp(logits * c, dim=1), negative_keys.shape[1]
        if negative_keys.dim() != 2:
            raise ValueError(f"unpaired negative_keys must have shape (m, d), got {tuple(negative_keys.shape)}")
        check_embeddings("negative_keys", negative_keys, dim=q.shape[1])
        neg = normalized_fp32(negative_keys)
        if self.gather:  # one global pool, in rank order
            neg = BatchLayout.exchange(len(neg), neg.device, True).gather(neg)
        return self._pool_lse(q, neg), len(neg)

    def _pool_lse(self, q: Tensor, pool: Tensor) -> Callable[[float], Tensor]:
        """lse(c) of every query over one pool of negatives (tiled with chunk_size)."""
        if self.chunk_size:
            return lambda c: row_logsumexp(q, pool, self.chunk_size, Logits(c))
        logits = logits_of(q, pool)
        return lambda c: torch.logsumexp(logits * c, dim=1)


class InfoNCEOptions(SoftmaxOptions, NegativeWeighting):
    """`loss.name: infonce`: queries against their keys (MNRL), with h hard negatives per row."""

    name: Literal["infonce"] = "infonce"
    rows: ClassVar[tuple[str, ...]] = ("negative",)

    def build(self) -> InfoNCELoss:
        return InfoNCELoss(self.temperature, chunk_size=self.chunk_size, decoupled=self.decoupled,
                           hard_negative_beta=self.hard_negative_beta)
