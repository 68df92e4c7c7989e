"""Representation quality: weighted kNN top-1 accuracy, retrieval recall@k, and sharded embedding."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distributed_cl import distributed as dist_utils


@torch.no_grad()
def knn_top1(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int = 20,
             temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy of a cosine kNN classifier whose k neighbours vote with weight
    exp(similarity / temperature) (Wu et al. 2018, the usual SSL monitor)."""
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError("knn_top1 needs a non-empty bank and query set")
    return knn_correct(bank, bank_labels, queries, query_labels, k, temperature, chunk) / len(queries)


@torch.no_grad()
def knn_correct(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> int:
    """How many queries `knn_top1`'s classifier gets right, on the device the inputs are on.
    Labels may be any int64 ids (hashed class names too): the vote runs over the bank's classes."""
    bank = F.normalize(bank.float(), dim=1)
    classes, bank_classes = torch.unique(bank_labels, return_inverse=True)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), len(classes), device=q.device).scatter_add_(1, bank_classes[idx], (sims / temperature).exp())
        correct += (classes[votes.argmax(1)] == query_labels[start : start + chunk]).sum().item()
    return correct


@torch.no_grad()
def sharded_knn_top1(embed_fn: Callable[[Tensor], Tensor], bank: Tensor, bank_labels: Tensor, queries: Tensor,
                     query_labels: Tensor, rank: int, world: int, device: torch.device, k: int = 20) -> float:
    """`knn_top1` of embed_fn's features, the work split over ranks: the bank is embedded sharded
    and gathered to every rank; each rank embeds and classifies its own shard of the queries on
    the device; the correct counts are summed."""
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError("knn_top1 needs a non-empty bank and query set")
    bank_features = sharded_embed(embed_fn, bank, rank, world, device).to(device)
    lo, hi = _shard(len(queries), rank, world)
    correct = 0
    if hi > lo:
        local = torch.cat([embed_fn(queries[i : min(i + 256, hi)]) for i in range(lo, hi, 256)])
        correct = knn_correct(bank_features, bank_labels.to(device), local, query_labels[lo:hi].to(device), k)
    return dist_utils.all_reduce_sum(torch.tensor([correct], device=device)).item() / len(queries)


def _shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous slice [lo, hi) of n items split as evenly as possible (as sharded_embed splits)."""
    bounds = np.linspace(0, n, world + 1).astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


@torch.no_grad()
def recall_at_k(queries: Tensor, keys: Tensor, ks: Sequence[int] = (1, 10), chunk: int = 1024) -> dict[int, float]:
    """Cosine retrieval where key i is the one correct answer of query i: the fraction of queries
    whose key ranks in the top k among all keys (ties count against the query)."""
    if len(queries) != len(keys) or len(keys) == 0:
        raise ValueError(f"recall_at_k needs as many keys as queries (one match each), got {len(queries)} and {len(keys)}")
    keys = F.normalize(keys.float(), dim=1)
    ranks = []
    for start in range(0, len(queries), chunk):
        sims = F.normalize(queries[start : start + chunk].float(), dim=1) @ keys.T
        correct = sims.gather(1, torch.arange(start, start + len(sims))[:, None])
        ranks.append((sims >= correct).sum(1) - 1)  # keys scoring at least as high as the match
    rank = torch.cat(ranks)
    return {k: (rank < k).float().mean().item() for k in ks}


@torch.no_grad()
def zero_shot_top1(images: Tensor, prompts: Tensor, classes: Tensor, labels: Tensor) -> float:
    """CLIP's zero-shot classification: each image takes the class whose prompt embedding is the
    most cosine-similar; the fraction whose class is its label. `prompts[j]` embeds `classes[j]`."""
    nearest = (F.normalize(images.float(), dim=1) @ F.normalize(prompts.float(), dim=1).T).argmax(1)
    return (classes.to(nearest.device)[nearest] == labels.to(nearest.device)).float().mean().item()


def sharded_embed(embed_fn: Callable[[Sequence], Tensor], items: Sequence, rank: int, world: int,
                  device: torch.device, batch_size: int = 256) -> Tensor:
    """Every rank embeds a contiguous shard of `items` (a tensor or a list) with `embed_fn` in
    batches; the gather (on the device: NCCL takes CUDA tensors only) returns all embeddings, in
    order, on every rank, as float32 on the CPU."""
    bounds = np.linspace(0, len(items), world + 1).astype(int)
    shard = items[bounds[rank] : bounds[rank + 1]]
    parts = [embed_fn(shard[i : i + batch_size]).float() for i in range(0, len(shard), batch_size)]
    local = torch.cat(parts).to(device) if parts else None
    if local is None:  # an empty shard still joins the gather, with the right width
        local = torch.empty(0, embed_fn(items[:1]).shape[1], device=device)
    return dist_utils.all_gather_no_grad(local, sizes=np.diff(bounds).tolist()).cpu()
