"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), as open_clip's SigLipLoss, exact under DDP.

Every (image i, text j) pair is its own binary problem: -log sigmoid(z_ij * (t * x_i . y_j + b)),
z = +1 for the matching pair and -1 for every other; the loss is the sum over all N^2 pairs / N.
Rank r sums its own image rows against every text and scales by W / N, so DDP's mean is the
single-process loss, and the mean over ranks of the scale's and bias's gradients is theirs.

The loss is a sum of elementwise terms whose derivative in s is sigmoid(s) - [positive], so one
pass over the logits gives the value and, when autograd wants it, the gradient: each tile of
logits is formed once, turned into its gradient in place and folded into the inputs' gradients
by two more products (three GEMMs a tile, as autograd's forward and backward; nothing of the tile
is kept). `chunk_size` bounds a tile at (chunk x chunk); without it one tile is (n_r x N).

Candidates reach a rank in one of two ways:
- gathered (default): the differentiable all-gather hands rank r every text (N x d);
- `neighbour_exchange=True`: the texts pass around the ring one rank's block at a time, by
  point-to-point sends, so a rank holds its own block and one visiting block (O(n x d)), never
  all N. Backward sends the blocks around again with their gradients, which come home at the
  end: every text's gradient sums every rank's contribution, each weighted by its own rank's
  upstream gradient, exactly as the gather's backward does.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from distributed_cl.losses.core import (
    BatchLayout,
    GatheredLoss,
    LossAndStats,
    autocast_off,
    check_embeddings,
    check_same_length,
    gemm_dtype,
    mm,
    normalized_fp32,
    returns_stats,
)
from distributed_cl.losses.options import LossOptions

MAX_LOGIT_SCALE = 100.0  # as ClipLoss: exp(logit_scale) is clamped here in the forward pass


def sigmoid_block(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, positive_offset: int | None,
                  chunk: int | None, dtype, with_grads: bool) -> tuple[Tensor, ...]:
    """sum_ij softplus(-z_ij s_ij), s = scale * x @ y.T + bias, z_ij = +1 where j = positive_offset + i.

    Returns (loss, grad_x, grad_y, grad_scale, grad_bias) at unit upstream gradient; the four
    gradients are None unless `with_grads`. Tiles of at most (chunk x chunk) (one tile if None)."""
    n, big_n = len(x), len(y)
    t, b = scale.detach(), bias.detach()  # tensors: no host sync on a GPU
    loss = x.new_zeros(())
    grads = (torch.zeros_like(x), torch.zeros_like(y), x.new_zeros(()), x.new_zeros(())) if with_grads else None
    rows, cols = chunk or max(n, 1), chunk or max(big_n, 1)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        for c0 in range(0, big_n, cols):
            c1 = min(c0 + cols, big_n)
            s = mm(x[r0:r1], y[c0:c1].T, dtype).mul_(t).add_(b)
            # the positives' term is softplus(-s) = softplus(s) - s: subtract their logits once
            positives = s.diagonal(positive_offset + r0 - c0) if positive_offset is not None else s.new_zeros(0)
            loss += F.softplus(s).sum() - positives.sum()
            if grads is None:
                continue
            grad_s = s.sigmoid_()  # d/ds: sigmoid(s) - [positive], written over the tile
            if positive_offset is not None:
                grad_s.diagonal(positive_offset + r0 - c0).sub_(1)
            grad_x, grad_y, grad_scale, grad_bias = grads
            grad_xy = mm(grad_s, y[c0:c1], dtype)  # rows of d loss / d (x_i . y_j) @ y, before the scale
            grad_scale += (grad_xy * x[r0:r1]).sum()  # sum_ij grad_s_ij * x_i . y_j
            grad_bias += grad_s.sum()
            grad_x[r0:r1].add_(grad_xy.mul_(t))
            grad_y[c0:c1].add_(mm(grad_s.T, x[r0:r1], dtype).mul_(t))
    return (loss, *(grads or (None,) * 4))


class _GatheredSigmoid(torch.autograd.Function):
    """This rank's rows against every (gathered) text; the gradients come from the forward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, y_all: Tensor, scale: Tensor, bias: Tensor, offset: int, chunk: int | None):  # type: ignore[override]
        loss, *grads = sigmoid_block(x, y_all, scale, bias, offset, chunk, gemm_dtype(), any(ctx.needs_input_grad))
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None  # one backward, as autograd's own graphs
        if grads is None:
            raise RuntimeError("SigLipLoss: backward through the same loss twice")
        return (*(g * grad for g in grads), None, None)


def _ring_pass(send: list[Tensor], layout: BatchLayout, hop: int) -> list[Tensor]:
    """Send tensors to the next rank and receive the previous rank's, padded to the largest block.
    After `hop` hops rank r holds the block that started on rank r - hop."""
    right, left = (layout.rank + 1) % layout.world, (layout.rank - 1) % layout.world
    rows = max(layout.sizes)
    padded = [torch.cat([t, t.new_zeros(rows - len(t), *t.shape[1:])]) if len(t) < rows else t.contiguous() for t in send]
    received = [torch.empty_like(t) for t in padded]
    ops = [dist.P2POp(dist.isend, t, right) for t in padded] + [dist.P2POp(dist.irecv, t, left) for t in received]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    n = layout.sizes[(layout.rank - hop) % layout.world]
    return [t[:n] for t in received]


class _RingSigmoid(torch.autograd.Function):
    """Neighbour exchange: the text blocks travel the ring; nothing N-sized is ever built."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, layout: BatchLayout, chunk: int | None):  # type: ignore[override]
        dtype = gemm_dtype()
        loss = sigmoid_block(x, y, scale, bias, 0, chunk, dtype, False)[0]
        block = y
        for hop in range(1, layout.world):
            (block,) = _ring_pass([block], layout, hop)
            loss += sigmoid_block(x, block, scale, bias, None, chunk, dtype, False)[0]
        ctx.layout, ctx.chunk, ctx.dtype = layout, chunk, dtype
        ctx.save_for_backward(x, y, scale, bias)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        layout, chunk, dtype = ctx.layout, ctx.chunk, ctx.dtype
        with torch.autocast(x.device.type, enabled=False):
            _, grad_x, grad_y, grad_scale, grad_bias = sigmoid_block(x, y, scale, bias, 0, chunk, dtype, True)
            block, carried = y, grad_y * grad  # a block travels with the gradient it has gathered so far
            for hop in range(1, layout.world):
                block, carried = _ring_pass([block, carried], layout, hop)
                _, gx, gy, gs, gb = sigmoid_block(x, block, scale, bias, None, chunk, dtype, True)
                grad_x += gx
                grad_scale += gs
                grad_bias += gb
                carried = carried + gy * grad
            if layout.world > 1:  # rank r holds rank r+1's block: one more hop takes it home
                (carried,) = _ring_pass([carried], layout, layout.world)
        return grad_x * grad, carried, grad_scale * grad, grad_bias * grad, None, None


class SigLipLoss(GatheredLoss):
    """`loss(image_emb, text_emb)`: the sigmoid loss over every image-text pair of the global batch.

    `logit_scale` (the log of the scale, as ClipLoss's) and `logit_bias` are learnable
    nn.Parameters, initialised as in the SigLIP paper: scale 10, bias -10. Put the loss's
    parameters in the optimizer (and in the DDP-wrapped module) to learn them.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, chunk_size: int | None = None,
                 neighbour_exchange: bool = False, gather: bool = True, learn_scale: bool = True) -> None:
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if not (isinstance(init_bias, (int, float)) and math.isfinite(init_bias)):
            raise ValueError(f"init_bias must be a finite number, got {init_bias!r}")
        super().__init__(1.0 / init_scale, gather, chunk_size)
        self.neighbour_exchange = neighbour_exchange
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", neighbour_exchange=True" if self.neighbour_exchange else "")

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    log_keys = ("temperature", "logit_bias")

    def logged(self) -> dict[str, float]:
        return {"temperature": 1 / self.scale.item(), "logit_bias": self.logit_bias.item()}

    @returns_stats
    @autocast_off
    def forward(self, image_emb: Tensor, text_emb: Tensor, *, memory=None) -> LossAndStats:
        if memory is not None:
            raise ValueError("SigLipLoss takes no memory of past keys (loss.queue_size is for the softmax losses)")
        check_embeddings("image_emb", image_emb)
        check_embeddings("text_emb", text_emb, dim=image_emb.shape[1])
        check_same_length("image_emb", image_emb, "text_emb", text_emb)
        image, text = normalized_fp32(image_emb), normalized_fp32(text_emb)
        layout = BatchLayout.exchange(len(image), image.device, self.gather)
        scale, bias = self.scale.reshape(()), self.logit_bias.float().reshape(())  # (a pretrained one may be (1,))
        if self.neighbour_exchange and layout.world > 1:
            loss_sum = _RingSigmoid.apply(image, text, scale, bias, layout, self.chunk_size)
        else:
            loss_sum = _GatheredSigmoid.apply(image, layout.gather(text), scale, bias, layout.offset, self.chunk_size)
        return self._finish_single_positive(loss_sum, layout)


class SigLipOptions(LossOptions):
    """`loss.name: siglip`: the sigmoid loss; the learnt scale and bias start from init_scale and
    init_bias (the SigLIP paper's); neighbour_exchange passes the texts around the ring of workers
    instead of gathering them (no worker holds all N)."""

    name: Literal["siglip"] = "siglip"
    init_scale: float = 10.0
    init_bias: float = -10.0
    chunk_size: int | None = None  # tiles of (chunk_size x chunk_size) logits
    neighbour_exchange: bool = False

    def build(self) -> SigLipLoss:
        return SigLipLoss(self.init_scale, self.init_bias, self.chunk_size, self.neighbour_exchange)
