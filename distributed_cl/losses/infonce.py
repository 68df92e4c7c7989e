"""InfoNCE with in-batch, unpaired or paired negatives, as info-nce-pytorch's InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distributed_cl.losses.core import (
    BatchLayout,
    GatheredLoss,
    autocast_off,
    check_embeddings,
    check_same_length,
    logits_of,
    normalized_fp32,
)
from distributed_cl.losses.fused import RowCrossEntropy
from distributed_cl.losses.tiled import row_logsumexp


class InfoNCELoss(GatheredLoss):
    """`loss(query, positive_key, negative_keys=None)`, one direction (query -> keys).

    - negative_keys=None: the other queries' positive keys (gathered from every rank) are the
      negatives.
    - negative_mode="unpaired", negative_keys (m, d): one shared pool, gathered from every rank.
    - negative_mode="paired", negative_keys (n, m, d): each query's own negatives; no gather.
    """

    def __init__(self, temperature: float = 0.1, negative_mode: str = "unpaired", gather: bool = True,
                 chunk_size: int | None = None) -> None:
        super().__init__(temperature, gather, chunk_size)
        if negative_mode not in ("unpaired", "paired"):
            raise ValueError(f"negative_mode must be 'unpaired' or 'paired', got {negative_mode!r}")
        self.negative_mode = negative_mode

    @autocast_off
    def forward(self, query: Tensor, positive_key: Tensor, negative_keys: Tensor | None = None) -> Tensor:
        check_embeddings("query", query)
        check_embeddings("positive_key", positive_key, dim=query.shape[1])
        check_same_length("query", query, "positive_key", positive_key)
        q = normalized_fp32(query) / self.temperature
        k = normalized_fp32(positive_key)
        layout = BatchLayout.exchange(len(q), q.device, self.gather)

        if negative_keys is None:
            if self.chunk_size:
                loss_sum = row_logsumexp(q, layout.gather(k), self.chunk_size).sum() - (q * k).sum()
            else:
                targets = layout.offset + torch.arange(len(q), device=q.device)
                loss_sum = RowCrossEntropy.apply(q, layout.gather(k), targets, None)
        else:
            pos_logit = (q * k).sum(dim=1)
            # -log(e^pos / (e^pos + sum e^neg)), without materialising [pos, negs]
            loss_sum = (torch.logaddexp(pos_logit, self._negative_lse(q, negative_keys)) - pos_logit).sum()
        return self._finish_single_positive(loss_sum, layout)

    def _negative_lse(self, q: Tensor, negative_keys: Tensor) -> Tensor:
        """Each query's log-sum-exp over its negatives. Paired negatives need no tiles: their
        (n x m) logits are a d-th of the (n x m x d) keys already in memory."""
        if self.negative_mode == "paired":
            if negative_keys.dim() != 3 or negative_keys.shape[0] != len(q) or negative_keys.shape[2] != q.shape[1]:
                raise ValueError(
                    f"paired negative_keys must have shape ({len(q)}, m, {q.shape[1]}), "
                    f"got {tuple(negative_keys.shape)}"
                )
            check_embeddings("negative_keys", negative_keys.flatten(0, 1))
            neg = F.normalize(negative_keys.float(), dim=2)
            return torch.logsumexp(torch.einsum("nd,nmd->nm", q, neg), dim=1)
        if negative_keys.dim() != 2:
            raise ValueError(f"unpaired negative_keys must have shape (m, d), got {tuple(negative_keys.shape)}")
        check_embeddings("negative_keys", negative_keys, dim=q.shape[1])
        neg = normalized_fp32(negative_keys)
        if self.gather:  # one global pool, in rank order
            neg = BatchLayout.exchange(len(neg), neg.device, True).gather(neg)
        if self.chunk_size:
            return row_logsumexp(q, neg, self.chunk_size)
        return torch.logsumexp(logits_of(q, neg), dim=1)
