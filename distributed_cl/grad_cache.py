"""Gradient caching (Gao et al. 2021, "GradCache"): a contrastive step on a local batch larger
than the encoder's activations allow, with the same gradient as the whole-batch step.

1. Embed the batch chunk by chunk without autograd, keeping each chunk's RNG state.
2. Compute the loss on the cached embeddings (gathered across workers inside the loss) and its
   gradient with respect to them; the loss's own parameters (CLIP's logit_scale) get theirs here.
3. Re-embed each chunk with autograd from its saved RNG state (the same dropout masks) and
   backpropagate the cached gradient. DDP averages gradients once, in the last chunk's backward
   (`no_sync` before it), and autocast is the same in both passes.

Activation memory is one chunk's; the price is a second forward pass of the towers.

BatchNorm normalises each chunk by that chunk's statistics in both passes (ghost batch norm),
and its running statistics are updated once per chunk: the first pass's updates are undone.
The step then equals the whole-batch step exactly for towers without batch statistics
(LayerNorm, GroupNorm: transformers) and with one dropout layer per tower (several dropout
layers draw their masks in another order than one whole-batch pass, an equally valid sample).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from distributed_cl.distributed import all_ranks_max
from distributed_cl.sharding import is_sharded

if TYPE_CHECKING:
    from distributed_cl.losses import LossStats
    from distributed_cl.tasks import ContrastiveModel


def split_batch(batch, size: int, count: int = 0) -> list:
    """A batch (tensors in nested dicts) cut along dim 0 into consecutive chunks of at most `size`
    samples, as equal as can be, and at least `count` of them. Every tensor's dim 0 is the rows:
    the rows' h hard negatives are (n, h, ...) (tasks' pair_extras), so a chunk takes all h of each
    of its rows."""
    n = len(batch["labels"])
    count = max(count, -(-n // size))
    bounds = [i * n // count for i in range(count + 1)]
    return [_slice(batch, slice(start, stop)) for start, stop in zip(bounds, bounds[1:])]


def _slice(batch, rows: slice):
    if isinstance(batch, Tensor):
        return batch[rows]
    if isinstance(batch, dict):
        return {key: _slice(value, rows) for key, value in batch.items()}
    return batch


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _buffers_kept(module: nn.Module):
    """Undo what a pass does to the buffers (BatchNorm's running statistics and batch count)."""
    saved = [buffer.clone() for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)


def grad_cache_backward(model: nn.Module, net: ContrastiveModel, batch: dict, chunk_size: int,
                        autocast: Callable[[], AbstractContextManager]) -> tuple[Tensor, LossStats]:
    """Leave the whole batch's gradient in the parameters' .grad (averaged over workers when
    `model` is DDP) and return the loss and its statistics. `net` is the ContrastiveModel inside `model`;
    `autocast` is a fresh context for each use (e.g. `functools.partial(torch.autocast, ...)`)."""
    n = len(batch["labels"])
    count, sharded = -(-n // chunk_size), is_sharded(net)
    if sharded:  # every rank runs the same passes: FSDP gathers each block's weights in each
        count = all_ranks_max(count, batch["labels"].device)
        if n < count:
            raise ValueError(f"gradient caching under FSDP: this rank's {n} rows cannot fill the {count} chunks "
                             "every rank runs (give the ranks equal local batches)")
    chunks = split_batch(batch, chunk_size, count)
    states, cached = [], []
    with torch.no_grad(), _buffers_kept(net.towers):
        for chunk in chunks:
            states.append(_rng_state())
            with autocast():  # (FSDP's hooks run in the model's forward)
                cached.append(model(chunk, embed_only=True) if sharded else net.embed(chunk))
    end_state = _rng_state()

    embeddings = [torch.cat(side).detach().requires_grad_() for side in zip(*cached)]  # z_a, z_b (, negatives (n, h, d))
    del cached  # the chunks' copies: memory per sample is what sets the largest batch
    with autocast():
        loss, stats = net.loss(embeddings, batch)
    loss.backward()  # d loss / d embeddings, and the loss's own parameters' gradients

    start = 0
    for i, (chunk, state) in enumerate(zip(chunks, states)):
        last = i == len(chunks) - 1
        _set_rng_state(state)
        with model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext(), autocast():
            outputs = model(chunk, embed_only=True)
        rows = slice(start, start + len(outputs[0]))
        torch.autograd.backward(list(outputs), [e.grad[rows] for e in embeddings])
        start = rows.stop
    _set_rng_state(end_state)
    return loss.detach(), stats
