"""retrieval.py's exact search, BEIR figures and negative selection, against sentence-transformers'
InformationRetrievalEvaluator, full-matrix torch.topk, faiss, and a brute-force reference."""

import itertools
import sys

import pytest
import torch
import torch.nn.functional as F

from distributed_cl.retrieval import BEIR_METRICS, TopK, id_order, ir_metrics, search, select_negatives


def dyadic_unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """n vectors of norm exactly 1 with entries in multiples of 1/8 (integers -3..3 whose squares sum
    to 64): every cosine is an exact multiple of 1/64 in float32 whatever the kernel or chunking, so
    equal scores are equal in sentence-transformers' matmul and in ours."""
    rows, have = [], 0
    while have < n:
        c = torch.randint(-3, 4, (4096, d), generator=g)
        rows.append(c[(c * c).sum(dim=1) == 64])
        have += len(rows[-1])
    return torch.cat(rows)[:n].float() / 8


def gaussian_without_ties(q: int, n: int, d: int, k: int, seed: int, gap: float = 1e-5):
    """Queries and keys whose first k + 1 scores of every query differ by more than `gap`: the first
    seed from `seed` on that gives such."""
    for attempt in range(seed, seed + 100):
        g = torch.Generator().manual_seed(attempt)
        queries, keys = torch.randn(q, d, generator=g), torch.randn(n, d, generator=g)
        exact = F.normalize(queries.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
        top = exact.sort(dim=1, descending=True).values[:, : k + 1]
        if (top[:, :-1] - top[:, 1:]).min() > gap:
            return queries, keys
    raise AssertionError("no seed gave data without near ties")


# ----------------------------------------------------------------------------- against the evaluator


class FixedEmbeddings:
    """Stands in for a SentenceTransformer: each text's embedding is looked up (the evaluator's
    compute_all_metrics calls only these two)."""

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    def encode_query(self, texts, **_) -> torch.Tensor:
        return torch.stack([self.table[t] for t in texts])

    encode_document = encode_query


def st_evaluator():
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:
        from sentence_transformers.evaluation import InformationRetrievalEvaluator
    if not hasattr(InformationRetrievalEvaluator, "get_corpus_id_ranks"):
        pytest.skip("this sentence-transformers breaks equal scores arbitrarily (no (-score, corpus id) order)")
    return InformationRetrievalEvaluator


def tie_group(ranking: list[int], scores: list[float], boundary: int) -> list[int] | None:
    """The positions (by rank) of the equal scores that straddle rank `boundary` (0-based: ranks
    boundary - 1 and boundary tied), or None."""
    at = [scores[j] for j in ranking]
    if at[boundary - 1] != at[boundary]:
        return None
    return [j for j in ranking if scores[j] == at[boundary]]


@pytest.mark.parametrize("ids", ["positions", "shuffled"])
def test_ir_metrics_of_topk_equal_sentence_transformers_evaluator(ids):
    Evaluator = st_evaluator()
    from sentence_transformers.util import cos_sim

    g = torch.Generator().manual_seed(1)
    n_base, n_copies, n_queries, d = 130, 30, 24, 16
    base = dyadic_unit(n_base, d, g)
    corpus = torch.cat([base, base[torch.randint(0, n_base, (n_copies,), generator=g)]])  # exact duplicates
    corpus = corpus[torch.randperm(len(corpus), generator=g)]
    near = corpus[torch.randint(0, len(corpus), (16,), generator=g)].clone()
    for row in near:  # swapping two entries keeps the norm exactly 1
        i, j = torch.randperm(d, generator=g)[:2].tolist()
        row[[i, j]] = row[[j, i]]
    queries = torch.cat([near, dyadic_unit(n_queries - len(near), d, g)])
    n = len(corpus)
    if ids == "positions":
        corpus_ids = [f"d{i:03d}" for i in range(n)]  # sorts as the positions: TopK's default order
    else:
        corpus_ids = [f"d{p:03d}" for p in torch.randperm(n, generator=g).tolist()]
    scores = (queries.double() @ corpus.double().T).tolist()  # exact: multiples of 1/64
    rankings = [sorted(range(n), key=lambda j, s=s: (-s[j], corpus_ids[j])) for s in scores]

    relevant: list[set[int]] = [set() for _ in range(n_queries)]
    for q in range(20):
        picks = torch.randint(0, 30 if q % 2 else n, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        relevant[q] = {rankings[q][r] for r in picks.tolist()}
    for q in (22, 23):  # one relevant document each
        relevant[q] = {rankings[q][int(torch.randint(0, 40, (1,), generator=g))]}
    for q, many in ((16, 12), (17, 110)):  # more than 10 (nDCG's ideal ranking), more than 100 (MAP's denominator)
        relevant[q] = {rankings[q][r] for r in torch.randperm(n, generator=g)[:many].tolist()}
    # queries 20 and 21 have none (20 absent from the judgements, 21 an empty set): both left out
    # Planted: one query's relevant documents are the last of a tie group straddling rank 10 and some
    # below it, another's the same at rank 100, so any tie order but (-score, id) moves them across
    # the cut-off (every figure but recall@100 at 10; recall@100 and map@100 at 100).
    planted = {}
    for boundary in (10, 100):
        for q in range(16):
            group = tie_group(rankings[q], scores[q], boundary)
            if q not in planted.values() and group and len(group) >= 3:
                relevant[q] = {group[-1]} | {j for j in relevant[q] if scores[q][j] < scores[q][group[0]]}
                planted[boundary] = q
                break
    assert set(planted) == {10, 100}, "no tie group straddles a cut-off: pick another seed"
    sizes = [len(r) for r in relevant]
    assert len(corpus) > 100 and {0, 1, 12, 110} <= set(sizes) and len(set(sizes)) > 6

    texts = {f"doc {i}": corpus[i] for i in range(n)} | {f"query {q}": queries[q] for q in range(n_queries)}
    judged = {f"q{q}": {corpus_ids[j] for j in relevant[q]} for q in range(n_queries) if q != 20}
    evaluator = Evaluator(
        queries={f"q{q}": f"query {q}" for q in range(n_queries)},
        corpus={corpus_ids[i]: f"doc {i}" for i in range(n)},
        relevant_docs=judged, corpus_chunk_size=37, precision_recall_at_k=[10, 100], mrr_at_k=[10],
        ndcg_at_k=[10], map_at_k=[100], accuracy_at_k=[1], score_functions={"cos_sim": cos_sim}, write_csv=False)
    compute = getattr(evaluator, "compute_all_metrics", None) or evaluator.compute_metrices
    st = compute(FixedEmbeddings(texts))["cos_sim"]
    expected = {"ndcg@10": st["ndcg@k"][10], "mrr@10": st["mrr@k"][10], "recall@10": st["recall@k"][10],
                "recall@100": st["recall@k"][100], "map@100": st["map@k"][100]}

    top = TopK(queries, 100, chunk=7)
    order = id_order(corpus_ids)
    for lo, hi in itertools.pairwise([0, 13, 14, 61, 101, n]):  # uneven chunks
        top.add(corpus[lo:hi], lo, order[lo:hi] if ids == "shuffled" else None)
    ranked = top.result()[1]
    given = relevant if ids == "positions" else [dict.fromkeys(r, 1) for r in relevant]  # graded form
    got = ir_metrics(ranked, given)
    assert list(got) == list(BEIR_METRICS)
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    assert ranked.tolist() == [r[:100] for r in rankings]
    assert 0 < got["recall@10"] < got["recall@100"] < 1


def test_ir_metrics_by_hand_and_its_refusals():
    ranked = torch.tensor([[5, 1, 7, 2], [3, 4, 0, 6], [0, 1, 2, 3]])
    got = ir_metrics(ranked, [{1, 2, 9}, set(), {0: 2}])  # the middle query has no relevant key: left out
    dcg = 1 / 1.5849625007211562 + 1 / 2.321928094887362
    ideal = 1 + 1 / 1.5849625007211562 + 1 / 2
    assert got["ndcg@10"] == pytest.approx((dcg / ideal + 1) / 2)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["recall@10"] == got["recall@100"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["map@100"] == pytest.approx(((1 / 2 + 2 / 4) / 3 + 1) / 2)
    with pytest.raises(ValueError, match="no query has a relevant key"):
        ir_metrics(ranked, [set(), set(), {}])
    with pytest.raises(ValueError, match="3 ranked lists for 2 queries"):
        ir_metrics(ranked, [{1}, {2}])


# ----------------------------------------------------------------------------- exact search


def test_topk_over_uneven_chunks_equals_full_topk_and_search():
    queries, keys = gaussian_without_ties(37, 300, 24, 20, seed=0)
    full = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    want_scores, want = full.topk(20, dim=1)
    top = TopK(queries, 20, chunk=8)
    for lo, hi in itertools.pairwise([0, 1, 50, 50, 51, 170, 300]):  # an empty chunk too
        top.add(keys[lo:hi], lo)
    scores, indices = top.result()
    assert indices.dtype == torch.int64 and indices.shape == (37, 20)
    assert torch.equal(indices, want)
    torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=0)
    s, i = search(queries, keys, 20, chunk=64)
    assert torch.equal(i, want)
    torch.testing.assert_close(s, want_scores, atol=1e-6, rtol=0)
    # k beyond the keys seen: all of them, sorted
    queries, keys = gaussian_without_ties(37, 15, 24, 14, seed=0, gap=1e-6)
    s, i = search(queries, keys, 50, chunk=4)
    full = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    assert i.shape == (37, 15) and torch.equal(i, full.argsort(dim=1, descending=True))


def test_topk_breaks_ties_by_order_whatever_the_chunks():
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(12, 4, generator=g), dim=1)
    keys[[2, 5, 6, 9, 11]] = keys[0].clone()  # six equal keys; a query on them has six equal best scores
    queries = torch.stack([keys[0], -keys[0]])
    for chunks in ([0, 12], [0, 3, 4, 10, 12], list(range(13))):
        top = TopK(queries, 4)
        for lo, hi in itertools.pairwise(chunks):
            top.add(keys[lo:hi], lo)
        assert top.result()[1][0].tolist() == [0, 2, 5, 6]
        reverse = TopK(queries, 4)  # a caller's order: here the reverse of the positions
        for lo, hi in itertools.pairwise(chunks):
            reverse.add(keys[lo:hi], lo, order=torch.arange(12 - lo, 12 - hi, -1))
        assert reverse.result()[1][0].tolist() == [11, 9, 6, 5]
        assert reverse.result()[1][1].tolist() == top.result()[1][1].tolist()  # no ties there
    assert id_order(["b", "c", "a"]).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopK(queries, 0)
    with pytest.raises(ValueError, match="keys must be"):
        TopK(queries, 3).add(torch.zeros(2, 5), 0)


def test_faiss_search_equals_torch_search(monkeypatch):
    pytest.importorskip("faiss")
    queries, keys = gaussian_without_ties(25, 400, 32, 30, seed=0)
    s, i = search(queries, keys, 30, use_faiss=True)
    ts, ti = search(queries, keys, 30)
    assert i.dtype == torch.int64 and torch.equal(i, ti)
    torch.testing.assert_close(s, ts, atol=1e-5, rtol=0)
    assert search(queries, keys[:7], 30, use_faiss=True)[1].shape == (25, 7)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        search(queries, keys, 3, use_faiss=True)


# ----------------------------------------------------------------------------- negatives


def reference_negatives(scores, indices, positive, excluded, m, range_min, range_max, relative, absolute, seed):
    """select_negatives by rows and loops: rule out, number those left, take the window, draw."""
    draw = torch.rand(scores.shape, generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for r, (row, idx, p, ex) in enumerate(zip(scores.tolist(), indices.tolist(), positive.tolist(), excluded.tolist())):
        left = [j for j, s in enumerate(row) if not ex[j] and idx[j] >= 0
                and (absolute is None or s <= p - absolute) and (relative is None or s <= p - abs(p) * relative)]
        window = left[range_min:range_max]
        chosen = sorted(sorted(window, key=lambda j: draw[r][j])[:m])
        out.append([idx[j] for j in chosen] + [-1] * (m - len(chosen)))
    return out


def mining_data(n: int, k: int, seed: int):
    """Ranked candidates on a grid of 1/64 (so margins of 1/8 and 1/4 land exactly on scores),
    exclusions, and some rows padded with index -1."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(-40, 64, (n, k), generator=g).float() / 64).sort(dim=1, descending=True).values
    indices = torch.stack([torch.randperm(1000, generator=g)[:k] for _ in range(n)])
    indices[: n // 5, -3:] = -1
    positive = torch.randint(-16, 64, (n,), generator=g).float() / 64
    excluded = torch.rand(n, k, generator=g) < 0.15
    return scores, indices, positive, excluded


@pytest.mark.parametrize("m, range_min, range_max, relative, absolute, seed", [
    (3, 0, 100, None, None, 0),
    (4, 5, 30, 0.25, None, 1),
    (2, 0, 12, None, 0.125, 2),
    (5, 2, 40, 0.25, 0.125, 3),
    (6, 10, 16, 0.0, 0.0, 4),
    (40, 0, 50, 0.5, None, 5),  # more asked than most rows have: -1 padding
])
def test_select_negatives_equals_brute_force_reference(m, range_min, range_max, relative, absolute, seed):
    scores, indices, positive, excluded = mining_data(40, 60, seed)
    if absolute is not None:  # a candidate exactly on the absolute margin stays (ST: it goes if s + margin > p)
        positive[0], excluded[0, 30] = scores[0, 30] + absolute, False
    got = select_negatives(scores, indices, positive, excluded, m, range_min, range_max, relative, absolute, seed)
    want = reference_negatives(scores, indices, positive, excluded, m, range_min, range_max, relative, absolute, seed)
    assert got.dtype == torch.int64 and got.shape == (40, m)
    assert got.tolist() == want
    assert torch.equal(got, select_negatives(scores, indices, positive, excluded, m, range_min, range_max, relative,
                                             absolute, seed))  # the same seed, the same draw
    if m < min(10, range_max - range_min):  # rows with more in their window than asked
        other = select_negatives(scores, indices, positive, excluded, m, range_min, range_max, relative, absolute,
                                 seed + 100)
        assert not torch.equal(got, other)


def test_select_negatives_ranks_after_ruling_out_and_pads_with_minus_one():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    indices = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    excluded = torch.tensor([[True, False, False, False, False, False], [False] * 6])
    positive = torch.tensor([1.0, 0.7])
    # row 0: 10 is ruled out, so ranks 1..2 of those left are 12 and 13; row 1: the margin leaves
    # 22 (0.7 <= 0.7 - 0), 23, 24, 25, of which ranks 1..2 are 23 and 24
    got = select_negatives(scores, indices, positive, excluded, 2, range_min=1, range_max=3, absolute_margin=0.0)
    assert got.tolist() == [[12, 13], [23, 24]]
    got = select_negatives(scores, indices, positive, excluded, 3, range_min=0, range_max=10, relative_margin=0.2)
    assert got[1].tolist() == [24, 25, -1]  # 0.7 - 0.14 = 0.56 leaves two, in rank order, then padding
    assert sorted(got[0].tolist()) == got[0].tolist() and set(got[0].tolist()) <= {11, 12, 13, 14, 15}
    everything = torch.ones_like(excluded)
    assert select_negatives(scores, indices, positive, everything, 2).tolist() == [[-1, -1], [-1, -1]]
    assert select_negatives(scores[:, :1], indices[:, :1], positive, excluded[:, :1], 3).tolist() == \
        [[-1, -1, -1], [20, -1, -1]]  # fewer candidates than negatives asked


def test_select_negatives_draws_uniformly():
    n = 6000  # one window of six, drawn in every row independently
    scores = torch.linspace(0.9, 0.1, 8).expand(n, -1)
    indices = torch.arange(8).expand(n, -1)
    excluded = torch.zeros(n, 8, dtype=torch.bool)
    got = select_negatives(scores, indices, torch.ones(n), excluded, 2, range_min=1, range_max=7, seed=7)
    assert (got[:, 0] < got[:, 1]).all() and got.min() >= 1 and got.max() <= 6
    pairs = torch.bincount(got[:, 0] * 8 + got[:, 1], minlength=64)
    counts = pairs[[a * 8 + b for a, b in itertools.combinations(range(1, 7), 2)]]
    assert counts.sum() == n and (counts - n / 15).abs().max() < 5 * (n / 15) ** 0.5  # 15 pairs, each 1/15


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_negatives=0), "num_negatives"),
    (dict(range_min=-1), "range_min"),
    (dict(range_min=5, range_max=5), "range_min"),
    (dict(num_negatives=4, range_min=2, range_max=5), "num_negatives"),
    (dict(relative_margin=1.0), "relative_margin"),
    (dict(relative_margin=-0.1), "relative_margin"),
    (dict(absolute_margin=-0.1), "absolute_margin"),
    (dict(positive_scores=torch.zeros(3)), "positive_scores"),
    (dict(excluded=torch.zeros(2, 5, dtype=torch.bool)), "excluded"),
])
def test_bad_mining_arguments_raise(kwargs, name):
    args = dict(scores=torch.zeros(2, 6), indices=torch.zeros(2, 6, dtype=torch.long), positive_scores=torch.zeros(2),
                excluded=torch.zeros(2, 6, dtype=torch.bool), num_negatives=2)
    with pytest.raises(ValueError, match=name):
        select_negatives(**(args | kwargs))
