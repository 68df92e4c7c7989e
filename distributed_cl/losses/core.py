"""The shared core of every contrastive loss: local anchor rows x gathered candidate columns.

Each rank scores its own n_r anchors against all N candidates (memory O(n_r * N), never N^2),
sums its anchors' losses and scales by W / A, where A is the global number of anchors that
have a positive. DDP's mean over ranks then gives exactly the gradient of the single-process
mean over the concatenated batch, and the mean over ranks of the returned values is the global
loss. Logits are fp32 whatever the input dtype; masked entries hold float32's most negative value, never a 1e9-style constant.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distributed_cl import distributed as dist_utils

MASKED = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class LossStats:
    """Global statistics of one loss call (identical on every rank): what a loss's forward
    returns beside the loss with `return_stats=True`."""

    anchors: int
    anchors_without_positive: int
    mean_positives: float  # over anchors that have at least one positive

    # what the trainer logs of them (`anchors` is the global batch, which the config sets)
    log_keys: ClassVar[tuple[str, ...]] = ("anchors_without_positive", "mean_positives")

    @property
    def empty(self) -> bool:
        """No anchor of the global batch has a positive: the loss is a connected zero."""
        return self.anchors_without_positive == self.anchors

    def logged(self) -> dict[str, int | float]:
        return {key: getattr(self, key) for key in self.log_keys}


LossAndStats = tuple[Tensor, LossStats]  # what a loss's forward computes (`returns_stats` unpacks it)


@dataclass(frozen=True)
class Memory:
    """Keys of past batches, extra candidates beyond the global batch (a queue, MoCo / XBM). The
    same on every rank, so never gathered, and constants: no gradient reaches them. `a` and `b`:
    (Q, d) keys of each side, `labels`: (Q,) their classes (used by the labelled losses)."""

    a: Tensor
    b: Tensor
    labels: Tensor

    def both(self) -> tuple[Tensor, Tensor]:
        """Both sides as one set of candidates and their labels (NT-Xent, SupCon)."""
        return torch.cat([self.a, self.b]), torch.cat([self.labels, self.labels])


def with_memory(candidates: Tensor, extra: Tensor | None) -> Tensor:
    """The gathered candidates with the memory's after them (in-batch indices are unchanged)."""
    return candidates if extra is None or not len(extra) else torch.cat([candidates, normalized_fp32(extra)])


@dataclass(frozen=True)
class BatchLayout:
    """Where this rank's rows sit in the global batch (the concatenation in rank order)."""

    sizes: list[int]
    rank: int

    @classmethod
    def exchange(cls, n: int, device: torch.device, gather: bool) -> BatchLayout:
        if not gather:
            return cls([n], 0)
        return cls(dist_utils.all_gather_sizes(n, device), dist_utils.get_rank())

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    def scaled(self, k: int) -> BatchLayout:
        """Layout of a tensor holding k rows per sample (e.g. two views stacked)."""
        return BatchLayout([k * s for s in self.sizes], self.rank)

    def per_rank(self) -> BatchLayout:
        """Layout of a tensor with one row per rank (per-rank statistics)."""
        return BatchLayout([1] * self.world, self.rank)

    def gather(self, x: Tensor) -> Tensor:
        """Differentiable gather of a tensor laid out like this batch."""
        if self.world == 1:
            return x
        return dist_utils.all_gather_with_grad(x, self.sizes)

    def gather_labels(self, labels: Tensor) -> Tensor:
        """Gather without autograd (labels, statistics)."""
        if self.world == 1:
            return labels
        return dist_utils.all_gather_no_grad(labels, self.sizes)


# ----------------------------------------------------------------------------- input checks


def check_embeddings(name: str, x: Tensor, dim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has embedding dim {x.shape[1]}, expected {dim}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_same_length(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} has {a.shape[0]} rows but {name_b} has {b.shape[0]}")


def as_labels(labels, n: int, device: torch.device, name: str = "labels") -> Tensor:
    labels = torch.as_tensor(labels, device=device)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
    return labels.long()


def check_temperature(temperature: float) -> float:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def normalized_fp32(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=1)


# The operand dtype of the logits GEMMs during one loss call (None: fp32 operands), set by
# autocast_off from the inputs and the caller's autocast; the autograd Functions keep it for backward.
_GEMM_DTYPE: ContextVar[torch.dtype | None] = ContextVar("gemm_dtype", default=None)


def gemm_dtype_for(device_type: str, input_dtype: torch.dtype) -> torch.dtype | None:
    """Half-precision GEMM operands (tensor cores, fp32 accumulation and output) on CUDA when the
    embeddings are bf16/fp16 or autocast is on; otherwise fp32 operands, exact as before. The
    softmax and log-sum-exp stay fp32 either way."""
    if device_type != "cuda":
        return None
    if input_dtype in (torch.bfloat16, torch.float16):
        return input_dtype
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def gemm_dtype() -> torch.dtype | None:
    return _GEMM_DTYPE.get()


def mm(a: Tensor, b: Tensor, dtype: torch.dtype | None) -> Tensor:
    """a @ b with fp32 output; with `dtype`, from operands rounded to it (fp32 accumulation)."""
    if dtype is None:
        return a @ b
    a, b = a.to(dtype), b.to(dtype)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # the same products, for CPU tests of this path


class _LogitsMM(torch.autograd.Function):
    """a @ b.T through `mm` in forward and backward (autograd cannot differentiate out_dtype)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, dtype: torch.dtype | None) -> Tensor:  # type: ignore[override]
        ctx.dtype = dtype
        ctx.save_for_backward(a, b)
        return mm(a, b.T, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        return mm(grad, b, ctx.dtype), mm(grad.T, a, ctx.dtype), None


def logits_of(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T in fp32, differentiable, with this loss call's GEMM operand dtype."""
    dtype = gemm_dtype()
    return a @ b.T if dtype is None else _LogitsMM.apply(a, b, dtype)


def autocast_off(forward):
    """Decorates a loss's forward: the loss keeps its own precision (fp32 logits and log-sum-exp)
    under torch.autocast, where a plain matmul would come out bf16 and a float32-min mask written
    into it would overflow. Inputs may still be bf16/fp16; they are cast up where needed, and on
    CUDA they (or autocast) make the GEMMs take half-precision operands (gemm_dtype_for)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        device = first.device.type if first is not None else "cpu"
        token = _GEMM_DTYPE.set(gemm_dtype_for(device, first.dtype) if first is not None else None)
        try:
            with torch.autocast(device, enabled=False):
                return forward(self, *args, **kwargs)
        finally:
            _GEMM_DTYPE.reset(token)

    return wrapper


def returns_stats(forward: Callable[..., LossAndStats]) -> Callable[..., Tensor | LossAndStats]:
    """Decorates a loss's forward, which computes (loss, LossStats) (`_finish` returns both): a
    plain call returns the loss, `return_stats=True` both. The last call's statistics also stay
    on `loss_fn.last_stats`, a convenience for interactive use (the trainer reads the returned ones)."""

    @functools.wraps(forward)
    def wrapper(self, *args, return_stats: bool = False, **kwargs):
        loss, stats = forward(self, *args, **kwargs)
        self.last_stats = stats
        return (loss, stats) if return_stats else loss

    signature = inspect.signature(forward)  # help() and IDEs show return_stats, and what it returns
    keyword = inspect.Parameter("return_stats", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
    parameters = list(signature.parameters.values())
    at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    wrapper.__signature__ = signature.replace(parameters=[*parameters[:at], keyword, *parameters[at:]],
                                              return_annotation="Tensor | tuple[Tensor, LossStats]")
    return wrapper


# ----------------------------------------------------------------------------- the maths


def masked_logits(anchors: Tensor, candidates: Tensor, self_offset: int | None) -> Tensor:
    """anchors @ candidates.T in fp32; if `self_offset` is given, anchor i is candidate
    self_offset + i and that entry is masked out."""
    logits = logits_of(anchors, candidates)
    if self_offset is not None:
        logits.diagonal(offset=self_offset).fill_(MASKED)
    return logits


def multi_positive_row_losses(logits: Tensor, positives: Tensor, denominator: str) -> tuple[Tensor, Tensor]:
    """Per-anchor losses with any number of positives per row (masked entries already MASKED).

    denominator="all" (SupCon): -mean_p log softmax_p over every non-self candidate.
    denominator="negatives" (NT-Xent with labels, as pytorch-metric-learning): each positive
    pair competes only against the anchor's negatives, -mean_p log(e^s_p / (e^s_p + sum_neg e^s_n)).
    Anchors without positives get 0 (finite, with zero gradient). Returns (losses, num_positives).
    """
    num_pos = positives.sum(dim=1)
    if denominator == "all":
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pair_losses = -log_prob
    elif denominator == "negatives":
        lse_neg = torch.logsumexp(logits.masked_fill(positives, MASKED), dim=1, keepdim=True)
        pair_losses = F.softplus(lse_neg - logits)
    else:
        raise ValueError(f"denominator must be 'all' or 'negatives', got {denominator!r}")
    pair_sum = torch.where(positives, pair_losses, 0.0).sum(dim=1)
    return pair_sum / num_pos.clamp(min=1), num_pos


def negative_log_mass(lse: Callable[[float], Tensor], count: Tensor | float, beta: float) -> Tensor:
    """log of an anchor's negative term, from `lse(c)` = log sum_j e^(c * l_j) over its negatives.

    beta = 0: log sum_j e^l_j, the usual denominator's negatives. beta > 0 (HCL, Robinson et al.
    2021): each negative weighted by e^(beta l_j) / mean_j e^(beta l_j), so harder negatives (more
    similar to the anchor) count more: log(M sum_j e^((1+beta) l_j) / sum_j e^(beta l_j)).
    """
    if beta == 0:
        return lse(1.0)
    hard, easy = lse(1.0 + beta), lse(beta)
    count = torch.as_tensor(count, dtype=hard.dtype, device=hard.device)
    return torch.where(count > 0, hard - easy + count.clamp(min=1).log(), MASKED)  # no negatives: MASKED


def anchor_losses(positive_logit: Tensor, log_mass: Tensor, decoupled: bool) -> Tensor:
    """-log(e^p / (e^p + Ng)), or with `decoupled` (DCL, Yeh et al. 2022) -log(e^p / Ng): the
    positive left out of the denominator."""
    if decoupled:  # an anchor without negatives (a one-class batch) has no DCL term
        return torch.where(log_mass > MASKED / 2, log_mass - positive_logit, 0.0)
    return F.softplus(log_mass - positive_logit)


def check_negative_options(decoupled: bool, hard_negative_beta: float) -> tuple[bool, float]:
    if not isinstance(decoupled, bool):
        raise ValueError(f"decoupled must be True or False, got {decoupled!r}")
    beta = hard_negative_beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"hard_negative_beta must be a finite number >= 0, got {beta!r}")
    return decoupled, float(beta)


def negative_options_repr(loss) -> str:
    return (", decoupled=True" if loss.decoupled else "") + (
        f", hard_negative_beta={loss.hard_negative_beta}" if loss.hard_negative_beta else "")


# ----------------------------------------------------------------------------- module base


class GatheredLoss(nn.Module):
    """Base for the contrastive losses: temperature check, the W/A scaling and statistics.

    `gather=False` scores local candidates only (a plain per-rank mean), for ablations.
    `chunk_size=c` computes the same loss in (c x c) tiles of logits, recomputed in backward
    (losses/tiled.py): extra memory O(c^2) instead of O(n_r x N), for batches whose logits do
    not fit; about one more matrix product per step.
    """

    def __init__(self, temperature: float, gather: bool = True, chunk_size: int | None = None) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.gather = gather
        self.chunk_size = check_chunk_size(chunk_size)
        self.last_stats: LossStats | None = None  # the last call's (`returns_stats`)

    # what `logged()` returns: the columns metrics.csv gives the loss, known before a worker starts
    log_keys: tuple[str, ...] = ("temperature",)

    def logged(self) -> dict[str, float]:
        """What the console and metrics.csv show of the loss (a learnt scale shows as its temperature)."""
        return {"temperature": self.temperature}

    def extra_repr(self) -> str:
        chunk = f", chunk_size={self.chunk_size}" if self.chunk_size else ""
        return f"temperature={self.temperature}, gather={self.gather}{chunk}"

    def _finish(
        self, loss_sum: Tensor, layout: BatchLayout, anchors: int, with_positive: int, positives: int
    ) -> LossAndStats:
        """L_r = W / A * sum of this rank's anchor losses (A = global anchors with a positive), and the statistics."""
        stats = LossStats(
            anchors=anchors,
            anchors_without_positive=anchors - with_positive,
            mean_positives=positives / with_positive if with_positive else 0.0,
        )
        if with_positive == 0:
            warnings.warn(
                f"{type(self).__name__}: no anchor in the global batch of {anchors} has a positive; "
                "the loss is 0 (use DistributedMPerClassSampler to guarantee positives)",
                RuntimeWarning,
                stacklevel=3,
            )
            return loss_sum * 0.0, stats  # zero, but still on the graph: backward and DDP run everywhere
        return loss_sum * (layout.world / with_positive), stats

    def _finish_single_positive(self, loss_sum: Tensor, layout: BatchLayout) -> LossAndStats:
        """Every anchor has exactly one positive (SimCLR, InfoNCE, CLIP): no counts to exchange."""
        return self._finish(loss_sum, layout, layout.total, layout.total, layout.total)

    def _finish_labelled(self, losses: Tensor, num_pos: Tensor, layout: BatchLayout) -> LossAndStats:
        """Counts are summed over ranks in one small all-reduce."""
        has_pos = num_pos > 0
        counts = torch.stack([has_pos.sum(), num_pos.sum()]).to(torch.float64)
        if layout.world > 1:
            counts = dist_utils.all_reduce_sum(counts)
        with_positive, positives = (int(c) for c in counts.tolist())
        return self._finish(losses.sum(), layout, layout.total, with_positive, positives)
