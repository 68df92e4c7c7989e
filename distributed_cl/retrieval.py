"""Exact retrieval maths: a running top-k over keys that arrive in chunks, the BEIR/MTEB figures, and
hard-negative selection. Pure functions of tensors (no Ray, no files), written to give the numbers
sentence-transformers gives: its InformationRetrievalEvaluator's figures and its mine_hard_negatives'
rules.

Tie rule: keys rank by (-score, order), where `order` is by default each key's position in the key
set. The evaluator ranks by (-score, corpus id), comparing ids as strings, for every chunking of the
corpus, so the two agree whenever the ids sort as their positions do; otherwise pass
`order=id_order(ids)[offset : offset + c]` to `TopK.add`. Scores are compared exactly (float32
cosines), so the figures are the evaluator's wherever both compute the same float32 scores; a pair of
keys whose cosines differ only by rounding in one matmul and not in the other can rank differently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BEIR_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")
RANKED = 100  # the deepest cut-off of BEIR_METRICS


def _best(scores: Tensor, order: Tensor, k: int) -> Tensor:
    """Column positions of each row's first min(k, columns) by (-score, order), in that order.
    torch.topk picks among equal scores arbitrarily, so rows whose k-th score is tied beyond the cut
    are re-picked by an integer key: above the cut first, then the ties by `order`."""
    k = min(k, scores.shape[1])
    values, pick = scores.topk(k, dim=1)
    cut = values[:, -1:]
    spilled = ((scores >= cut).sum(dim=1) > k).nonzero().squeeze(1)
    if len(spilled):
        s, c = scores[spilled], cut[spilled]
        low, high = torch.iinfo(torch.long).min, torch.iinfo(torch.long).max
        key = torch.where(s > c, low, torch.where(s == c, order[spilled], high))
        pick[spilled] = key.topk(k, dim=1, largest=False).indices
    pick = pick.gather(1, order.gather(1, pick).argsort(dim=1, stable=True))
    return pick.gather(1, scores.gather(1, pick).argsort(dim=1, descending=True, stable=True))


class TopK:
    """The k best keys of every query by cosine similarity over a key set fed in chunks (`add`),
    exactly and without a queries x keys matrix: memory is about `chunk` x (k + the chunk's keys)."""

    def __init__(self, queries: Tensor, k: int, chunk: int = 4096) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if queries.dim() != 2:
            raise ValueError(f"queries must be (q, d), got shape {tuple(queries.shape)}")
        self.queries, self.k, self.chunk = F.normalize(queries.float(), dim=1), k, chunk
        n, device = len(queries), queries.device
        self.scores = torch.empty(n, 0, device=device)
        self.indices = torch.empty(n, 0, dtype=torch.long, device=device)
        self.order = torch.empty(n, 0, dtype=torch.long, device=device)

    def add(self, keys: Tensor, offset: int, order: Tensor | None = None) -> None:
        """Keys (c, d), rows offset..offset+c-1 of the key set. `order` (c,): their tie ranks, distinct
        across the key set (default: their positions; `id_order` gives the evaluator's)."""
        if keys.dim() != 2 or keys.shape[1] != self.queries.shape[1]:
            raise ValueError(f"keys must be (c, {self.queries.shape[1]}), got shape {tuple(keys.shape)}")
        if len(keys) == 0:
            return
        device = self.queries.device
        keys = F.normalize(keys.to(device, torch.float32), dim=1)
        index = torch.arange(offset, offset + len(keys), device=device)
        order = index if order is None else order.to(device, torch.long)
        if order.shape != index.shape:
            raise ValueError(f"order must be ({len(keys)},), got shape {tuple(order.shape)}")
        merged = []
        for lo in range(0, len(self.queries), self.chunk):
            hi = lo + self.chunk
            s = torch.cat([self.scores[lo:hi], self.queries[lo:hi] @ keys.T], dim=1)
            i = torch.cat([self.indices[lo:hi], index.expand(len(s), -1)], dim=1)
            o = torch.cat([self.order[lo:hi], order.expand(len(s), -1)], dim=1)
            best = _best(s, o, self.k)
            merged.append((s.gather(1, best), i.gather(1, best), o.gather(1, best)))
        if merged:
            self.scores, self.indices, self.order = (torch.cat(part) for part in zip(*merged))

    def result(self) -> tuple[Tensor, Tensor]:
        """(scores float32, key indices int64), each (queries, min(k, keys seen)), best first."""
        return self.scores, self.indices


def id_order(ids: Sequence[str]) -> Tensor:
    """Each id's rank in sorted order: the `order` for `TopK.add` that breaks ties as the evaluator
    does (by corpus id), whatever order the corpus arrives in."""
    ranks = torch.empty(len(ids), dtype=torch.long)
    ranks[torch.tensor(sorted(range(len(ids)), key=ids.__getitem__), dtype=torch.long)] = torch.arange(len(ids))
    return ranks


def search(queries: Tensor, keys: Tensor, k: int, chunk: int = 4096, use_faiss: bool = False) -> tuple[Tensor, Tensor]:
    """TopK's exact search when the keys are in memory: (scores, indices), (q, min(k, keys)), best first.
    `use_faiss`: faiss's exact inner-product index on the normalised vectors, faster on a large key
    set (the same results, but equal scores in faiss's own order)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not use_faiss:
        top = TopK(queries, k, chunk)
        for lo in range(0, len(keys), chunk):
            top.add(keys[lo : lo + chunk], lo)
        return top.result()
    try:
        import faiss
    except ImportError:
        raise ImportError("use_faiss needs faiss: pip install faiss-cpu (or distributed_cl[faiss])") from None
    if len(keys) == 0:
        return search(queries, keys, k, chunk)  # (q, 0) of each
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(F.normalize(keys.detach().float(), dim=1).cpu().contiguous().numpy())
    scores, indices = index.search(F.normalize(queries.detach().float(), dim=1).cpu().contiguous().numpy(),
                                   min(k, len(keys)))
    return torch.from_numpy(scores).to(queries.device), torch.from_numpy(indices).long().to(queries.device)


def ir_metrics(ranked: Tensor, relevant: list[set[int]] | list[dict[int, int]]) -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@10, Recall@100 and MAP@100, means over the queries, from each query's
    ranked key indices (best first, up to 100 used) and its relevant keys, as sentence-transformers'
    InformationRetrievalEvaluator computes them: binary relevance (a key listed is relevant whatever
    its grade, as the evaluator treats the same dict: leave grade-0 judgements out), nDCG's ideal
    ranking min(10, relevant) ones, MAP divided by min(100, relevant), and queries without a
    relevant key left out of every mean (ValueError when none is left)."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} ranked lists for {len(relevant)} queries")
    judged = [(row, wanted) for row, wanted in zip(ranked.tolist(), relevant) if len(wanted)]
    if not judged:
        raise ValueError("no query has a relevant key")
    totals = dict.fromkeys(BEIR_METRICS, 0.0)
    for row, wanted in judged:
        hits = [doc in wanted for doc in row[:RANKED]]
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(wanted), 10)))
        totals["ndcg@10"] += sum(1 / math.log2(i + 2) for i, hit in enumerate(hits[:10]) if hit) / ideal
        totals["mrr@10"] += next((1 / (i + 1) for i, hit in enumerate(hits[:10]) if hit), 0.0)
        totals["recall@10"] += sum(hits[:10]) / len(wanted)
        totals["recall@100"] += sum(hits) / len(wanted)
        found, precision = 0, 0.0
        for i, hit in enumerate(hits):
            found += hit
            precision += hit * found / (i + 1)
        totals["map@100"] += precision / min(RANKED, len(wanted))
    return {name: total / len(judged) for name, total in totals.items()}


def check_mining(num_negatives: int, range_min: int, range_max: int, relative_margin: float | None,
                 absolute_margin: float | None) -> None:
    """The mining options' ranges (ValueError naming the option), mine_hard_negatives' checks and more."""
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if range_min < 0:
        raise ValueError(f"range_min must be >= 0, got {range_min}")
    if range_min >= range_max:
        raise ValueError(f"range_min must be < range_max, got range_min={range_min}, range_max={range_max}")
    if num_negatives > range_max - range_min:
        raise ValueError(f"num_negatives={num_negatives} is more than the {range_max - range_min} ranks "
                         f"range_min={range_min} to range_max={range_max} hold")
    if relative_margin is not None and not 0 <= relative_margin < 1:
        raise ValueError(f"relative_margin must be in [0, 1), got {relative_margin}")
    if absolute_margin is not None and not absolute_margin >= 0:
        raise ValueError(f"absolute_margin must be >= 0, got {absolute_margin}")


def select_negatives(scores: Tensor, indices: Tensor, positive_scores: Tensor, excluded: Tensor, num_negatives: int,
                     range_min: int = 0, range_max: int = 100, relative_margin: float | None = None,
                     absolute_margin: float | None = None, seed: int = 0) -> Tensor:
    """Hard negatives of each anchor from its ranked candidates (`scores`, `indices` (n, k), best
    first), by mine_hard_negatives' rules (sampling_strategy="random"):

    - ruled out: the `excluded` candidates (the row's own positive, a candidate with its text),
      padding (index < 0), and likely false negatives by the margins against the anchor's positive
      score p: a candidate s goes if s + absolute_margin > p, or if s > p - |p| * relative_margin;
    - ranks: those left, in rank order, are numbered from 0, and ranks range_min..range_max - 1 are
      the window (mine_hard_negatives ranks after ruling out, as it sets the ruled-out scores to
      -inf before its top-k). Pass k >= range_max + the most a row can rule out;
    - draw: the `num_negatives` of the window with the smallest
      torch.rand((n, k), generator=torch.Generator().manual_seed(seed)), a uniform sample without
      replacement, returned in rank order.

    (n, num_negatives) int64 candidate indices; a row with fewer in its window ends in -1s."""
    check_mining(num_negatives, range_min, range_max, relative_margin, absolute_margin)
    if scores.dim() != 2 or indices.shape != scores.shape or excluded.shape != scores.shape:
        raise ValueError(f"scores, indices and excluded must have one (n, k) shape, got {tuple(scores.shape)}, "
                         f"{tuple(indices.shape)}, {tuple(excluded.shape)}")
    if positive_scores.shape != scores.shape[:1]:
        raise ValueError(f"positive_scores must be ({len(scores)},), got shape {tuple(positive_scores.shape)}")
    n, k = scores.shape
    positive = positive_scores.to(scores.device)[:, None]
    valid = ~excluded.to(scores.device, torch.bool) & (indices >= 0)
    if absolute_margin is not None:
        valid &= ~(scores + absolute_margin > positive)
    if relative_margin is not None:
        valid &= ~(scores > positive - positive.abs() * relative_margin)
    rank = valid.long().cumsum(dim=1) - 1  # among the candidates left
    window = valid & (rank >= range_min) & (rank < range_max)
    draw = torch.rand(n, k, generator=torch.Generator().manual_seed(seed)).to(scores.device)
    picked = draw.masked_fill(~window, 2.0).topk(min(num_negatives, k), dim=1, largest=False).indices
    picked = torch.where(window.gather(1, picked), picked, picked + k).sort(dim=1).values  # rank order, misses last
    chosen = indices.long().gather(1, picked % k).masked_fill(picked >= k, -1) if k else picked
    return torch.cat([chosen, chosen.new_full((n, num_negatives - chosen.shape[1]), -1)], dim=1)
