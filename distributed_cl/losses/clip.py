"""CLIP's symmetric image-text loss, as open_clip's ClipLoss, at three GEMMs per step.

open_clip (local_loss=True) computes image rows and text rows separately: two (n_r x N)
products forward and four backward. Here rank r computes only its image rows S_r = I_r T^T;
the text->image softmax over column j needs every rank's rows, so ranks share per-column
log-sum-exps (N floats each; see fused.ClipBlock). One product forward, two backward.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from distributed_cl.losses.core import (
    BatchLayout,
    GatheredLoss,
    LossAndStats,
    Memory,
    autocast_off,
    check_embeddings,
    check_same_length,
    normalized_fp32,
    returns_stats,
    with_memory,
)
from distributed_cl.losses.fused import ClipBlock, RowCrossEntropy
from distributed_cl.losses.options import SoftmaxOptions
from distributed_cl.losses.tiled import row_and_column_logsumexp, row_logsumexp

MAX_LOGIT_SCALE = 100.0


class ClipLoss(GatheredLoss):
    """`loss(image_emb, text_emb)`: image i and text i are the only positive pair.

    `logit_scale` is a learnable nn.Parameter initialised to log(1 / temperature); the logit
    scale is `logit_scale.exp()`, clamped at 100 as in CLIP. Put the loss's parameters in the
    optimizer (and in the DDP-wrapped module) to learn it.
    """

    def __init__(self, temperature: float = 0.07, gather: bool = True, learn_temperature: bool = True,
                 chunk_size: int | None = None) -> None:
        super().__init__(temperature, gather, chunk_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.temperature)), requires_grad=learn_temperature)

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def logged(self) -> dict[str, float]:
        return {"temperature": 1 / self.scale.item()}

    @returns_stats
    @autocast_off
    def forward(self, image_emb: Tensor, text_emb: Tensor, *, memory: Memory | None = None) -> LossAndStats:
        """`memory`: past images and texts; image rows get the texts as extra negatives, text rows
        the images."""
        check_embeddings("image_emb", image_emb)
        check_embeddings("text_emb", text_emb, dim=image_emb.shape[1])
        check_same_length("image_emb", image_emb, "text_emb", text_emb)
        image = normalized_fp32(image_emb) * self.scale
        text = normalized_fp32(text_emb)
        layout = BatchLayout.exchange(len(image), image.device, self.gather)
        text_all = layout.gather(text)
        if memory is not None:
            return self._finish_single_positive(self._with_memory(image, text, text_all, layout, memory) / 2, layout)
        if self.chunk_size:
            # column j's log-sum-exp runs over every rank's rows: combine the ranks' partial ones
            row_lse, col_lse_partial = row_and_column_logsumexp(image, text_all, self.chunk_size)
            col_lse = torch.logsumexp(layout.per_rank().gather(col_lse_partial[None]), dim=0)
            own = slice(layout.offset, layout.offset + len(image))
            loss_sum = row_lse.sum() + col_lse[own].sum() - 2 * (image * text).sum()
        else:
            loss_sum = ClipBlock.apply(image, text_all, layout)  # image->text + text->image
        return self._finish_single_positive(loss_sum / 2, layout)

    def _with_memory(self, image: Tensor, text: Tensor, text_all: Tensor, layout: BatchLayout, memory: Memory) -> Tensor:
        """Both directions as row cross-entropies (the images gathered too): image rows over every
        text and the memory's texts, text rows over every image and the memory's images."""
        images = torch.cat([layout.gather(image), normalized_fp32(memory.a) * self.scale])
        texts = with_memory(text_all, memory.b)
        if self.chunk_size:
            rows = row_logsumexp(image, texts, self.chunk_size).sum() + row_logsumexp(text, images, self.chunk_size).sum()
            return rows - 2 * (image * text).sum()
        targets = layout.offset + torch.arange(len(image), device=image.device)
        return RowCrossEntropy.apply(image, texts, targets, None) + RowCrossEntropy.apply(text, images, targets, None)


class ClipOptions(SoftmaxOptions):
    """`loss.name: clip`: images against captions both ways, a learnt temperature from `temperature`."""

    name: Literal["clip"] = "clip"

    def build(self) -> ClipLoss:
        return ClipLoss(self.temperature, chunk_size=self.chunk_size)
