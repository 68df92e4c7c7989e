"""Exact contrastive losses in tiles: memory O(chunk x chunk) instead of O(n_r x N).

Every loss here is a log-sum-exp over candidates plus terms that are linear in a few logits
(the positive's, a class sum), which cost O(n x d) and stay with autograd. The log-sum-exps are
computed one (chunk x chunk) tile of logits at a time, with an online max and sum, and backward
recomputes each tile instead of keeping it: d lse_i / d s_ij = exp(s_ij - lse_i), so a tile's
gradient is one exp and two matrix products. Values equal the untiled losses to fp32 rounding.
GEMMs take the loss call's operand dtype (core.gemm_dtype), as the untiled Functions do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distributed_cl.losses.core import MASKED, gemm_dtype, mm


@dataclass(frozen=True)
class Logits:
    """The logits scale * q @ k.T (a scale, not a scaled copy of q: one (n x d) buffer fewer) and
    which are left out. `self_offset`: row i is candidate self_offset + i. `row_labels` and
    `col_labels`: also leave out same-label candidates (a negatives-only sum)."""

    scale: float = 1.0
    self_offset: int | None = None
    row_labels: Tensor | None = None
    col_labels: Tensor | None = None

    def apply_(self, s: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Write -inf over the left-out entries of tile s = rows r0:r1 x columns c0:c1, in place."""
        if self.self_offset is not None:  # anchor r0 + i is column c0 + i + (r0 + offset - c0)
            s.diagonal(offset=r0 + self.self_offset - c0).fill_(-torch.inf)
        if self.row_labels is not None:
            s.masked_fill_(self.row_labels[r0:r1, None] == self.col_labels[None, c0:c1], -torch.inf)
        return s


def _tiles(n: int, big_n: int, chunk: int):
    for r0 in range(0, n, chunk):
        for c0 in range(0, big_n, chunk):
            yield r0, min(r0 + chunk, n), c0, min(c0 + chunk, big_n)


def _logits(q: Tensor, k: Tensor, spec: Logits, r0: int, r1: int, c0: int, c1: int, dtype) -> Tensor:
    return spec.apply_(_scaled_mm(q[r0:r1], k[c0:c1].T, spec.scale, dtype), r0, r1, c0, c1)


def _scaled_mm(a: Tensor, b: Tensor, scale: float, dtype) -> Tensor:
    if dtype is None:  # the scale rides in the GEMM (BLAS alpha): no pass over the tile
        return torch.addmm(a.new_empty(len(a), b.shape[1]), a, b, beta=0, alpha=scale)
    s = mm(a, b, dtype)
    return s if scale == 1 else s.mul_(scale)


def _add_mm(out: Tensor, a: Tensor, b: Tensor, dtype, alpha: float = 1) -> None:
    """out += alpha * a @ b, in place (one fused call on the fp32 path)."""
    if dtype is None:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_(mm(a, b, dtype), alpha=alpha)


def _online_update(run_max: Tensor, run_sum: Tensor, s: Tensor, dim: int, overwrite: bool) -> None:
    """Fold tile `s` into a running max and sum of exp along `dim`, in place (and over `s`
    itself if `overwrite`: no second tile-sized buffer)."""
    new_max = torch.maximum(run_max, s.amax(dim))
    shift = torch.where(new_max == -torch.inf, 0.0, new_max)  # all masked so far: nothing to shift
    shifted = s.sub_(shift.unsqueeze(dim)) if overwrite else s - shift.unsqueeze(dim)
    run_sum.mul_((run_max - shift).exp_()).add_(shifted.exp_().sum(dim))
    run_max.copy_(new_max)


def _finish_lse(run_max: Tensor, run_sum: Tensor) -> Tensor:
    # a row with every candidate masked gets MASKED, as the untiled losses' masked logits give
    return torch.where(run_max == -torch.inf, MASKED, run_max + run_sum.log())


class TiledLogSumExp(torch.autograd.Function):
    """Row and/or column log-sum-exps of q @ k.T (masked entries left out), tile by tile."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, spec: Logits, chunk: int, rows: bool, cols: bool):  # type: ignore[override]
        n, big_n, dtype = len(q), len(k), gemm_dtype()
        row_max, row_sum = q.new_full((n,), -torch.inf), q.new_zeros(n)
        col_max, col_sum = q.new_full((big_n,), -torch.inf), q.new_zeros(big_n)
        for r0, r1, c0, c1 in _tiles(n, big_n, chunk):
            s = _logits(q, k, spec, r0, r1, c0, c1, dtype)
            if cols:
                _online_update(col_max[c0:c1], col_sum[c0:c1], s, 0, overwrite=not rows)
            if rows:
                _online_update(row_max[r0:r1], row_sum[r0:r1], s, 1, overwrite=True)
        row_lse, col_lse = _finish_lse(row_max, row_sum), _finish_lse(col_max, col_sum)
        ctx.spec, ctx.chunk, ctx.rows, ctx.cols, ctx.dtype = spec, chunk, rows, cols, dtype
        ctx.save_for_backward(q, k, row_lse, col_lse)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_rows: Tensor, grad_cols: Tensor):  # type: ignore[override]
        q, k, row_lse, col_lse = ctx.saved_tensors
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
        with torch.autocast(q.device.type, enabled=False):
            for r0, r1, c0, c1 in _tiles(len(q), len(k), ctx.chunk):
                s = _logits(q, k, ctx.spec, r0, r1, c0, c1, ctx.dtype)
                # d lse_i / d s_ij = softmax_ij (masked entries: exp(-inf) = 0), written over s
                col_part = (s - col_lse[None, c0:c1]).exp_().mul_(grad_cols[None, c0:c1]) if ctx.cols else None
                if ctx.rows:
                    grad_s = s.sub_(row_lse[r0:r1, None]).exp_().mul_(grad_rows[r0:r1, None])
                    grad_s = grad_s if col_part is None else grad_s.add_(col_part)
                else:
                    grad_s = col_part
                _add_mm(grad_q[r0:r1], grad_s, k[c0:c1], ctx.dtype, alpha=ctx.spec.scale)
                _add_mm(grad_k[c0:c1], grad_s.T, q[r0:r1], ctx.dtype, alpha=ctx.spec.scale)
        return grad_q, grad_k, None, None, None, None


def row_logsumexp(q: Tensor, k: Tensor, chunk: int, spec: Logits = Logits()) -> Tensor:
    """lse_j (scale * q_i . k_j) over the candidates `spec` leaves, for every row i of q."""
    return TiledLogSumExp.apply(q, k, spec, chunk, True, False)[0]


def row_and_column_logsumexp(q: Tensor, k: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Both directions of q @ k.T in one pass over the tiles (CLIP)."""
    return TiledLogSumExp.apply(q, k, Logits(), chunk, True, True)


class TiledPositiveSoftplus(torch.autograd.Function):
    """sum over positives j of row i of softplus(lse_neg_i - s_ij), tile by tile: NT-Xent with
    labels, where each positive pair competes with the anchor's negatives only. Positives are
    the same-label candidates other than the anchor itself."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, lse_neg: Tensor, spec: Logits, chunk: int) -> Tensor:  # type: ignore[override]
        out, dtype = q.new_zeros(len(q)), gemm_dtype()
        for r0, r1, c0, c1 in _tiles(len(q), len(k), chunk):
            s, positive = _positive_logits(q, k, spec, r0, r1, c0, c1, dtype)
            out[r0:r1] += torch.where(positive, F.softplus(lse_neg[r0:r1, None] - s), 0.0).sum(1)
        ctx.spec, ctx.chunk, ctx.dtype = spec, chunk, dtype
        ctx.save_for_backward(q, k, lse_neg)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, lse_neg = ctx.saved_tensors
        grad_q, grad_k, grad_lse = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(lse_neg)
        with torch.autocast(q.device.type, enabled=False):
            for r0, r1, c0, c1 in _tiles(len(q), len(k), ctx.chunk):
                s, positive = _positive_logits(q, k, ctx.spec, r0, r1, c0, c1, ctx.dtype)
                # d softplus(l - s) = sigmoid(l - s) (dl - ds)
                weight = torch.where(positive, torch.sigmoid(lse_neg[r0:r1, None] - s), 0.0).mul_(grad[r0:r1, None])
                grad_lse[r0:r1] += weight.sum(1)
                _add_mm(grad_q[r0:r1], weight, k[c0:c1], ctx.dtype, alpha=-ctx.spec.scale)
                _add_mm(grad_k[c0:c1], weight.T, q[r0:r1], ctx.dtype, alpha=-ctx.spec.scale)
        return grad_q, grad_k, grad_lse, None, None


def _positive_logits(q: Tensor, k: Tensor, spec: Logits, r0: int, r1: int, c0: int, c1: int, dtype) -> tuple[Tensor, Tensor]:
    """A tile of logits and which of its entries are positives: same label, not the anchor."""
    positive = spec.row_labels[r0:r1, None] == spec.col_labels[None, c0:c1]
    positive.diagonal(offset=r0 + spec.self_offset - c0).fill_(False)  # the anchor itself
    return _scaled_mm(q[r0:r1], k[c0:c1].T, spec.scale, dtype), positive


def positive_softplus_sum(q: Tensor, k: Tensor, lse_neg: Tensor, spec: Logits, chunk: int) -> Tensor:
    return TiledPositiveSoftplus.apply(q, k, lse_neg, spec, chunk)


def class_index(labels: Tensor) -> Tensor:
    """Each label's class as 0..C-1 (for per-class sums and counts without an (n x N) mask)."""
    return torch.unique(labels, return_inverse=True)[1]


def class_sums(k: Tensor, index: Tensor) -> Tensor:
    """Per-class sums of the rows of k (differentiable); `index` from class_index."""
    return k.new_zeros(int(index.max()) + 1 if len(index) else 0, k.shape[1]).index_add(0, index, k)


def positive_counts(index: Tensor, offset: int, n: int) -> Tensor:
    """Same-class candidates of local rows offset..offset+n (`index` from class_index over every
    rank's labels), each row itself excluded."""
    return index.bincount()[index[offset : offset + n]] - 1
