"""Gradient caching (Gao et al. 2021, "GradCache"): a contrastive step on a local batch larger
than the encoder's activations allow, with the same gradient as the whole-batch step.

1. Embed the batch chunk by chunk without autograd, keeping each chunk's RNG state.
2. Compute the loss on the cached embeddings (gathered across workers inside the loss) and its
   gradient with respect to them; the loss's own parameters (CLIP's logit_scale) get theirs here.
3. Re-embed each chunk with autograd from its saved RNG state (the same dropout masks) and
   backpropagate the cached gradient. DDP averages gradients once, in the last chunk's backward
   (`no_sync` before it), and autocast is the same in both passes.

Activation memory is one chunk's; the price is a second forward pass of the towers.

Chunks are rows (`train.grad_cache_chunk`), or a token budget (`train.grad_cache_tokens`): the
rows sorted by length and each chunk padded to its own longest text, the embeddings put back in
the batch's order for the loss. Under FSDP every rank runs the same number of chunks (each pass
through a sharded block gathers its weights from all ranks), and each chunk's backward
reduce-scatters its share of the gradient: the sum over chunks is the whole-batch gradient.

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
    return [take_rows(batch, rows) for rows in chunk_rows(batch, size, None, count)]


def chunk_rows(batch: dict, size: int | None, tokens: int | None = None, count: int = 0) -> list[Tensor]:
    """The rows of each chunk: consecutive chunks of at most `size` rows, as equal as can be; or
    with a token budget, the rows sorted by length, longest first, each chunk as many as keep its
    padded tokens (rows x the longest text of each side, and of each hard negative) within
    `tokens` (and at most `size` rows). At least `count` chunks: the largest split in two."""
    n = len(batch["labels"])
    lengths = _token_lengths(batch) if tokens else []
    if not lengths:
        count = max(count, -(-n // size)) if n else count
        bounds = [i * n // count for i in range(count + 1)] if count else [0]
        return [torch.arange(start, stop) for start, stop in zip(bounds, bounds[1:])]
    total = sum(length * h for length, h in lengths)
    chunks, current, longest = [], [], [0] * len(lengths)
    for i in torch.argsort(total, descending=True, stable=True).tolist():
        grown = [max(m, int(length[i])) for m, (length, _) in zip(longest, lengths)]
        padded = (len(current) + 1) * sum(m * h for m, (_, h) in zip(grown, lengths))
        if current and (padded > tokens or (size and len(current) >= size)):
            chunks.append(current)
            current, grown = [], [int(length[i]) for length, _ in lengths]
        current.append(i)
        longest = grown
    chunks += [current] if current else []
    while len(chunks) < count:
        largest = max(range(len(chunks)), key=lambda j: len(chunks[j]))
        rows = chunks.pop(largest)
        chunks[largest:largest] = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    return [torch.tensor(rows, dtype=torch.long) for rows in chunks]


def _token_lengths(batch: dict) -> list[tuple[Tensor, int]]:
    """For each tokenised input of the batch (a side, the hard negatives): every row's length
    (its longest negative's), and how many texts a row holds there."""
    out = []
    for key in ("a", "b", "negative"):
        tokens = batch.get(key)
        if isinstance(tokens, dict) and "attention_mask" in tokens:
            mask = tokens["attention_mask"]
            out.append((mask.sum(-1), 1) if mask.dim() == 2 else (mask.sum(-1).amax(1), mask.shape[1]))
    return out


def take_rows(batch, rows: Tensor, trim: bool = False):
    """The batch's `rows` (dim 0 of every tensor); with `trim`, each tokenised input cut to the
    columns its rows use (a chunk of short texts pays for no padding of the batch's longest)."""
    if isinstance(batch, Tensor):
        return batch[rows.to(batch.device)]
    if not isinstance(batch, dict):
        return batch
    taken = {key: take_rows(value, rows, trim) for key, value in batch.items()}
    if trim and "attention_mask" in taken:
        used = taken["attention_mask"].flatten(0, -2).any(0)
        if not used.all():  # padding is at one end: the used columns are contiguous
            columns = used.nonzero().flatten()
            keep = slice(int(columns[0]), int(columns[-1]) + 1)
            taken = {key: value[..., keep] if isinstance(value, Tensor) and value.shape[-1] == used.numel() else value
                     for key, value in taken.items()}
    return taken


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


def grad_cache_backward(model: nn.Module, net: ContrastiveModel, batch: dict, chunk_size: int | None,
                        autocast: Callable[[], AbstractContextManager],
                        chunk_tokens: int | None = None) -> tuple[Tensor, LossStats]:
    """Leave the whole batch's gradient in the parameters' .grad (averaged over workers when
    `model` is DDP or FSDP) and return the loss and its statistics. `net` is the ContrastiveModel
    inside `model`; chunks of `chunk_size` rows, or by a token budget (`chunk_tokens`: see
    `chunk_rows`; the loss sees the rows in their own order); `autocast` is a fresh context for
    each use (e.g. `functools.partial(torch.autocast, ...)`)."""
    n, sharded = len(batch["labels"]), is_sharded(net)
    chunks = chunk_rows(batch, chunk_size, chunk_tokens)
    if sharded:  # every rank runs the same passes: FSDP gathers each block's weights in each
        count = all_ranks_max(len(chunks), batch["labels"].device)
        if n < count:
            raise ValueError(f"gradient caching under FSDP: this rank's {n} rows cannot fill the {count} chunks "
                             "every rank runs (give the ranks equal local batches)")
        chunks = chunk_rows(batch, chunk_size, chunk_tokens, count)
    inputs = [take_rows(batch, rows, trim=True) for rows in chunks]
    states, cached = [], []
    with torch.no_grad(), _buffers_kept(net.towers):
        for chunk in inputs:
            states.append(_rng_state())
            with autocast():  # (FSDP's hooks run in the model's forward)
                cached.append(model(chunk, embed_only=True) if sharded else net.embed(chunk))
    end_state = _rng_state()

    order = torch.cat(chunks).argsort().to(batch["labels"].device)  # the chunks' rows back in the batch's order
    embeddings = [torch.cat(side)[order].detach().requires_grad_() for side in zip(*cached)]  # z_a, z_b (, negatives)
    del cached  # the chunks' copies: memory per sample is what sets the largest batch
    with autocast():
        loss, stats = net.loss(embeddings, batch)
    loss.backward()  # d loss / d embeddings, and the loss's own parameters' gradients

    for i, (chunk, rows, state) in enumerate(zip(inputs, chunks, states)):
        last = i == len(inputs) - 1
        _set_rng_state(state)
        with model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext(), autocast():
            outputs = model(chunk, embed_only=True)
        rows = rows.to(batch["labels"].device)
        torch.autograd.backward(list(outputs), [e.grad[rows] for e in embeddings])
    _set_rng_state(end_state)
    return loss.detach(), stats
