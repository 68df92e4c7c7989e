"""Fused softmax cross-entropy blocks with hand-written backward passes.

Autograd's cross_entropy keeps the logits, the log-softmax and, in backward, a one-hot matrix
and a gradient matrix, each (n x N). These Functions keep one softmax matrix per direction
(written over the logits in place) and turn the backward into the two unavoidable matrix
products plus O(n * d) corrections: d(sum CE)/d logits = P - onehot, so
grad_q = P @ k - k[targets] and grad_k = P.T @ q - scatter(q at targets).
Logits are fp32: the calling losses run with autocast off (core.autocast_off), and backward
turns it off again, since it may run under the caller's autocast. The GEMMs take the operand
dtype of the loss call (core.gemm_dtype: bf16/fp16 on CUDA for half-precision embeddings or
under autocast, fp32 otherwise) and accumulate in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distributed_cl.losses.core import MASKED, BatchLayout, gemm_dtype, masked_logits, mm

# Below this a target probability is too small for -log(p) to be exact; such rows are
# recomputed with a log-sum-exp (it takes a loss above ~69, e.g. temperature 0.01).
_TINY = 1e-30


def _softmax_(logits: Tensor) -> Tensor:
    """Row softmax written over its input: no second (n x N) buffer."""
    return torch.ops.aten._softmax.out(logits, 1, False, out=logits)


def _target_nll(probs: Tensor, targets: Tensor, exact_logits) -> Tensor:
    """-log probs[i, targets[i]]; rows whose target probability underflowed are recomputed
    exactly from `exact_logits(rows)` (their logits with masks applied)."""
    target_p = probs.gather(1, targets[:, None]).squeeze(1)
    nll = -target_p.log()
    tiny = (target_p < _TINY).nonzero().squeeze(1)
    if len(tiny):
        logits = exact_logits(tiny)
        nll[tiny] = torch.logsumexp(logits, 1) - logits.gather(1, targets[tiny, None]).squeeze(1)
    return nll


class RowCrossEntropy(torch.autograd.Function):
    """sum_i CE(q_i @ k.T, targets_i), masking candidate self_offset + i of row i if given."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, targets: Tensor, self_offset: int | None) -> Tensor:  # type: ignore[override]
        dtype = gemm_dtype()

        def logits_of(rows: Tensor) -> Tensor:
            logits = mm(q[rows], k.T, dtype)
            if self_offset is not None:
                logits[torch.arange(len(rows), device=q.device), self_offset + rows] = MASKED
            return logits

        probs = _softmax_(masked_logits(q, k, self_offset))
        loss = _target_nll(probs, targets, logits_of).sum()
        ctx.dtype = dtype
        ctx.save_for_backward(q, k, targets, probs)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, targets, probs = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grad_q = mm(probs, k, ctx.dtype).sub_(k[targets]).mul_(grad)
            grad_k = mm(probs.T, q, ctx.dtype).index_add_(0, targets, q, alpha=-1).mul_(grad)
        return grad_q, grad_k, None, None


class ClipBlock(torch.autograd.Function):
    """This rank's share of CLIP's symmetric loss from its rows S_r = image @ text_all.T.

    Returns sum over local pairs i of [CE(row i) + CE(column offset+i)]. The column softmax
    needs every rank's rows, so ranks exchange per-column partial log-sum-exps (N floats
    each). In backward, column j's softmax is weighted by the upstream gradient of the rank
    that owns column j, so the result is exact for any per-rank loss weighting.
    """

    @staticmethod
    def forward(ctx, image: Tensor, text_all: Tensor, layout: BatchLayout) -> Tensor:  # type: ignore[override]
        n, o = len(image), layout.offset
        own = torch.arange(n, device=image.device)
        dtype = ctx.dtype = gemm_dtype()
        logits = mm(image, text_all.T, dtype)
        diag = logits.diagonal(offset=o).clone()
        row_probs = torch.softmax(logits, dim=1)
        row_nll = _target_nll(row_probs, o + own, lambda rows: mm(image[rows], text_all.T, dtype))

        # column softmax: exp(S - col_max) over our rows, rescaled by the global column sums
        col_max = logits.amax(dim=0) if n else torch.full((len(text_all),), -torch.inf, device=image.device)
        col_probs = logits.sub_(col_max).exp_()
        partial_lse = col_max + col_probs.sum(dim=0).log()
        ranks_lse = layout.per_rank().gather_labels(partial_lse[None])
        col_lse = torch.logsumexp(ranks_lse, dim=0)
        col_probs.mul_((col_max - col_lse).exp())
        loss = row_nll.sum() + (col_lse[o : o + n] - diag).sum()
        ctx.layout = layout
        ctx.save_for_backward(image, text_all, row_probs, col_probs)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        image, text_all, row_probs, col_probs = ctx.saved_tensors  # version check: one backward only
        layout: BatchLayout = ctx.layout
        o, n = layout.offset, len(image)
        with torch.autocast(image.device.type, enabled=False):
            owner_grads = layout.per_rank().gather_labels(grad.reshape(1))
            col_grad = torch.repeat_interleave(owner_grads, torch.tensor(layout.sizes, device=grad.device))
            grad_logits = row_probs.mul_(grad).add_(col_probs.mul_(col_grad))
            # both CE terms of pair i pull -1 on the diagonal entry (i, o + i)
            grad_image = mm(grad_logits, text_all, ctx.dtype).sub_(text_all[o : o + n], alpha=2 * grad)
            grad_text = mm(grad_logits.T, image, ctx.dtype)
            grad_text[o : o + n] -= 2 * grad * image
        return grad_image, grad_text, None
