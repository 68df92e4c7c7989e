"""The gradient contract on 2, 3 and 4 gloo ranks with different data and unequal local sizes.

Each rank feeds its slice of one global batch to a loss; the parent process computes the same
loss single-process on the whole batch. After DDP's mean the gradients must be equal: rank r's
input gradient / W equals the reference gradient of its slice, the mean over ranks of the
`logit_scale` gradient equals the reference one, and the mean of returned values is the loss.
"""

import copy
import functools
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from reference import rel_err, weighted_negatives_loop
from torch import nn

from distributed_cl import distributed as dist_utils
from distributed_cl.distributed import run_on_local_ranks
from distributed_cl.losses import (
    ClipLoss,
    ContrastiveLoss,
    InfoNCELoss,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
    pair_labels,
)
from distributed_cl.losses.core import Memory
from distributed_cl.profiling import LargestTensors

D = 8
SIZES = {2: [5, 3], 3: [4, 1, 6], 4: [3, 0, 5, 2]}  # world 4 has a rank with an empty batch


def _rand(name, *shape):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(*shape, generator=g)


def _labels(name, n, classes):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
    return torch.randint(0, classes, (n,), generator=g)


# Every gathered loss also runs in tiles of 2 x 2 logits (chunk_size), against the untiled reference.
CHUNKED = ("ntxent", "ntxent_two_views_labels", "ntxent_labels", "supcon", "supcon_sparse_labels", "infonce_in_batch",
           "infonce_unpaired", "clip", "siglip", "siglip_ring", "ntxent_decoupled_hard", "ntxent_labels_decoupled",
           "ntxent_labels_hard", "infonce_decoupled_hard", "infonce_unpaired_hard", "ntxent_memory",
           "ntxent_labels_memory", "supcon_memory", "infonce_memory", "clip_memory", "infonce_hard_negatives")


def MEMORY():
    """Past keys, the same on every rank (the queue's): extra candidates, no gradient."""
    return Memory(_rand("ma", 5, D), _rand("mb", 5, D), _labels("ml", 5, 4))


# A case: (loss module, global inputs, per-input local sizes, call). Inputs are split by rank.
def CASES(sizes):
    n = sum(sizes)
    neg_sizes = [s + 2 * r for r, s in enumerate(sizes)]  # unpaired pools differ in size too
    cases = {
        "ntxent": (NTXentLoss(0.2), [_rand("a", n, D), _rand("b", n, D)], [sizes, sizes], lambda m, a, b: m(a, b)),
        "ntxent_two_views_labels": (
            NTXentLoss(0.2),
            [_rand("a", n, D), _rand("b", n, D), _labels("y", n, 3)],
            [sizes] * 3,
            lambda m, a, b, y: m(a, b, labels=y),
        ),
        "ntxent_labels": (NTXentLoss(0.1), [_rand("z", n, D), _labels("y", n, 4)], [sizes] * 2, lambda m, z, y: m(z, labels=y)),
        "supcon": (SupConLoss(0.1), [_rand("z", n, D), _labels("y", n, 3)], [sizes] * 2, lambda m, z, y: m(z, y)),
        "supcon_sparse_labels": (
            SupConLoss(0.3),
            [_rand("z", n, D), _labels("y2", n, n)],  # many anchors without a positive
            [sizes] * 2,
            lambda m, z, y: m(z, y),
        ),
        "infonce_in_batch": (InfoNCELoss(0.1), [_rand("q", n, D), _rand("k", n, D)], [sizes] * 2, lambda m, q, k: m(q, k)),
        "infonce_unpaired": (
            InfoNCELoss(0.1),
            [_rand("q", n, D), _rand("k", n, D), _rand("neg", sum(neg_sizes), D)],
            [sizes, sizes, neg_sizes],
            lambda m, q, k, neg: m(q, k, neg),
        ),
        "infonce_paired": (
            InfoNCELoss(0.1, negative_mode="paired"),
            [_rand("q", n, D), _rand("k", n, D), _rand("neg", n, 3, D)],
            [sizes] * 3,
            lambda m, q, k, neg: m(q, k, neg),
        ),
        "clip": (ClipLoss(0.1), [_rand("i", n, D), _rand("t", n, D)], [sizes] * 2, lambda m, i, t: m(i, t)),
        "siglip": (SigLipLoss(5.0, -2.0), [_rand("i", n, D), _rand("t", n, D)], [sizes] * 2, lambda m, i, t: m(i, t)),
        "siglip_ring": (  # neighbour exchange: texts pass around the ring; its reference is the gathered loss
            SigLipLoss(5.0, -2.0, neighbour_exchange=True), [_rand("i", n, D), _rand("t", n, D)], [sizes] * 2,
            lambda m, i, t: m(i, t),
        ),
        "ntxent_decoupled_hard": (
            NTXentLoss(0.2, decoupled=True, hard_negative_beta=0.5), [_rand("a", n, D), _rand("b", n, D)], [sizes] * 2,
            lambda m, a, b: m(a, b),
        ),
        "ntxent_labels_decoupled": (
            NTXentLoss(0.1, decoupled=True), [_rand("z", n, D), _labels("y", n, 4)], [sizes] * 2, lambda m, z, y: m(z, labels=y),
        ),
        "ntxent_labels_hard": (
            NTXentLoss(0.1, hard_negative_beta=0.7), [_rand("z", n, D), _labels("y", n, 4)], [sizes] * 2,
            lambda m, z, y: m(z, labels=y),
        ),
        "infonce_decoupled_hard": (
            InfoNCELoss(0.1, decoupled=True, hard_negative_beta=0.5), [_rand("q", n, D), _rand("k", n, D)], [sizes] * 2,
            lambda m, q, k: m(q, k),
        ),
        "infonce_hard_negatives": (  # every query meets every rank's positives and hard negatives
            InfoNCELoss(0.1), [_rand("q", n, D), _rand("k", n, D), _rand("h", n, D)], [sizes] * 3,
            lambda m, q, k, h: m(q, k, hard_negatives=h),
        ),
        "ntxent_memory": (NTXentLoss(0.2), [_rand("a", n, D), _rand("b", n, D)], [sizes] * 2,
                          lambda m, a, b: m(a, b, memory=MEMORY())),
        "ntxent_labels_memory": (NTXentLoss(0.1, hard_negative_beta=0.5), [_rand("z", n, D), _labels("y", n, 4)],
                                 [sizes] * 2, lambda m, z, y: m(z, labels=y, memory=MEMORY())),
        "supcon_memory": (SupConLoss(0.1), [_rand("z", n, D), _labels("y2", n, 6)], [sizes] * 2,
                          lambda m, z, y: m(z, y, memory=MEMORY())),
        "infonce_memory": (InfoNCELoss(0.1), [_rand("q", n, D), _rand("k", n, D)], [sizes] * 2,
                           lambda m, q, k: m(q, k, memory=MEMORY())),
        "clip_memory": (ClipLoss(0.1), [_rand("i", n, D), _rand("t", n, D)], [sizes] * 2,
                        lambda m, i, t: m(i, t, memory=MEMORY())),
        "infonce_unpaired_hard": (
            InfoNCELoss(0.1, hard_negative_beta=0.5),
            [_rand("q", n, D), _rand("k", n, D), _rand("neg", sum(neg_sizes), D)],
            [sizes, sizes, neg_sizes],
            lambda m, q, k, neg: m(q, k, neg),
        ),
        "pairs_margin": (
            ContrastiveLoss(0.7),
            [_rand("x1", n, D), _rand("x2", n, D), _labels("same", n, 2)],
            [sizes] * 3,
            lambda m, a, b, y: m(a, b, y),
        ),
        "pairs_supcon": (  # pair ids must not collide across ranks
            SupConLoss(0.2),
            [_rand("x1", n, D), _rand("x2", n, D), _labels("same", n, 2)],
            [sizes] * 3,
            lambda m, a, b, y: m(torch.cat([a, b]), torch.cat(pair_labels(y))),
        ),
    }
    for name in CHUNKED:
        module, *rest = cases[name]
        chunked = copy.deepcopy(module)
        chunked.chunk_size = 2
        cases[f"{name}_chunked"] = (chunked, *rest)
    return cases


def _split(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def _run_case(module, inputs, call):
    inputs = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    loss, stats = call(functools.partial(module, return_stats=True), *inputs)
    loss.backward()
    grads = [x.grad for x in inputs if x.is_floating_point()]
    return loss.detach(), grads, [p.grad.clone() for p in module.parameters()], stats


class TwoTower(nn.Module):
    """A tiny model whose DDP-averaged parameter gradients we compare, logit_scale included."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text, self.loss = nn.Linear(6, D), nn.Linear(5, D), ClipLoss(0.1)

    def forward(self, x_img, x_txt):
        return self.loss(self.image(x_img), self.text(x_txt))


def _worker(rank, world, sizes, out_dir):
    results = {}
    for name, (module, inputs, in_sizes, call) in CASES(sizes).items():
        local = [_split(x, s, rank) for x, s in zip(inputs, in_sizes)]
        results[name] = _run_case(module, local, call)

    # Neighbour exchange never holds all N texts: the most rows of any (rows x D) tensor it makes,
    # forward and backward, against the gathered loss's.
    results["candidate_rows"] = {}
    for ring in (False, True):
        i, t = (_split(_rand(s, sum(sizes), D), sizes, rank).requires_grad_() for s in ("ri", "rt"))
        with LargestTensors(width=D) as made:
            SigLipLoss(neighbour_exchange=ring)(i, t).backward()
        results["candidate_rows"][ring] = made.rows

    # The gather itself: rank r weights the gathered tensor with its own w_r.
    x = _split(_rand("gx", sum(sizes), 3), sizes, rank).requires_grad_()
    gathered = dist_utils.all_gather_with_grad(x)
    (gathered * _rand(f"w{rank}", sum(sizes), 3)).sum().backward()
    results["gather"] = (gathered.detach(), x.grad)

    # Real DDP with unequal local batches: parameter grads (logit_scale included) after its mean.
    ddp = nn.parallel.DistributedDataParallel(TwoTower())
    x_img, x_txt = _rand("ximg", sum(sizes), 6), _rand("xtxt", sum(sizes), 5)
    loss = ddp(_split(x_img, sizes, rank), _split(x_txt, sizes, rank))
    loss.backward()
    results["ddp"] = (loss.detach(), {k: p.grad.clone() for k, p in ddp.module.named_parameters()})

    # gather=False: each rank's loss is the plain loss of its own batch, no collective.
    a, b = _split(_rand("la", sum(sizes), D), sizes, rank), _split(_rand("lb", sum(sizes), D), sizes, rank)
    results["local_only"] = [loss(a, b).detach() for loss in (NTXentLoss(gather=False), ClipLoss(gather=False), InfoNCELoss(gather=False))]

    # A global batch with no positive pair at all: every rank warns, backward runs, no NaN.
    z = _split(_rand("np", sum(sizes), D), sizes, rank).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        empty = SupConLoss()(z, torch.arange(len(z)) + sum(sizes[:rank]))
    empty.backward()
    results["no_positives"] = (empty.detach(), z.grad, [str(w.message) for w in caught])
    torch.save(results, f"{out_dir}/{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3, 4])
def ranks(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    run_on_local_ranks(_worker, world, SIZES[world], str(out_dir), timeout=180)
    return world, SIZES[world], [torch.load(out_dir / f"{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("name", list(CASES([1])))
def test_gradients_equal_single_process(ranks, name):
    world, sizes, results = ranks
    _, inputs, in_sizes, call = CASES(sizes)[name]
    reference = name.removesuffix("_chunked").replace("siglip_ring", "siglip")
    module = CASES(sizes)[reference][0]  # the reference is always untiled and gathered
    ref_loss, ref_grads, ref_param_grads, ref_stats = _run_case(module, inputs, call)

    mean_loss = sum(r[name][0] for r in results) / world
    assert rel_err(mean_loss, ref_loss) < 1e-5, (mean_loss, ref_loss)
    float_sizes = [s for x, s in zip(inputs, in_sizes) if x.is_floating_point()]
    for i, (ref_grad, s) in enumerate(zip(ref_grads, float_sizes)):
        for rank in range(world):
            got = results[rank][name][1][i] / world  # DDP divides by W
            assert rel_err(got, _split(ref_grad, s, rank)) < 1e-5, f"input {i} rank {rank}"
    for p, ref in enumerate(ref_param_grads):  # logit_scale: replicated, so DDP's mean
        mean_grad = sum(r[name][2][p] for r in results) / world
        assert rel_err(mean_grad, ref) < 1e-5
    assert all(r[name][3] == ref_stats for r in results)  # the global batch's statistics, on every rank


def test_neighbour_exchange_holds_one_block_of_texts_never_all_of_them(ranks):
    world, sizes, results = ranks
    for r in results:
        assert r["candidate_rows"][False] == sum(sizes)  # gathered: every text (and its gradient)
        assert r["candidate_rows"][True] <= max(sizes) < sum(sizes)  # the ring: a block, padded to the largest


def test_gather_concatenates_and_sums_gradients(ranks):
    world, sizes, results = ranks
    n = sum(sizes)
    torch.testing.assert_close(results[0]["gather"][0], _rand("gx", n, 3))
    total_weight = sum(_rand(f"w{r}", n, 3) for r in range(world))  # d/dx of sum_r <gather(x), w_r>
    for rank in range(world):
        torch.testing.assert_close(results[rank]["gather"][1], _split(total_weight, sizes, rank))


def test_ddp_parameter_gradients_equal_single_process(ranks):
    world, sizes, results = ranks
    model = TwoTower()
    loss = model(_rand("ximg", sum(sizes), 6), _rand("xtxt", sum(sizes), 5))
    loss.backward()
    assert rel_err(sum(r["ddp"][0] for r in results) / world, loss.detach()) < 1e-5
    for name, p in model.named_parameters():
        for r in results:  # DDP leaves the same averaged gradient on every rank
            assert rel_err(r["ddp"][1][name], p.grad) < 1e-5, name


def test_gather_false_is_the_local_loss(ranks):
    world, sizes, results = ranks
    for rank in (r for r in range(world) if sizes[r]):
        a, b = _split(_rand("la", sum(sizes), D), sizes, rank), _split(_rand("lb", sum(sizes), D), sizes, rank)
        expected = [NTXentLoss()(a, b), ClipLoss()(a, b), InfoNCELoss()(a, b)]
        for got, ref in zip(results[rank]["local_only"], expected):
            assert rel_err(got, ref.detach()) < 1e-6


def test_no_positives_anywhere_is_a_connected_zero_on_every_rank(ranks):
    world, sizes, results = ranks
    for rank, r in enumerate(results):
        loss, grad, messages = r["no_positives"]
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros(sizes[rank], D))
        assert any("no anchor" in m for m in messages)


def _rank_one_fails(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return "rank 0 done"


def test_run_on_local_ranks_reports_a_failed_rank():
    with pytest.raises(RuntimeError, match=r"rank exit codes \[0, 1\]"):
        run_on_local_ranks(_rank_one_fails, 2, timeout=60)


# ----------------------------------------------------------------------------- h hard negatives a row

H = 3
HARD_SIZES = {1: [5], 2: [4, 2], 3: [3, 0, 5]}  # unequal local batches, one of them empty
HARD_VARIANTS = {  # name: (the loss's options, input dtype, under bf16 autocast)
    "plain": ({}, torch.float32, False),
    "chunked": ({"chunk_size": 2}, torch.float32, False),
    "decoupled_hard": ({"decoupled": True, "hard_negative_beta": 0.5}, torch.float32, False),
    "decoupled_hard_chunked": ({"decoupled": True, "hard_negative_beta": 0.5, "chunk_size": 2}, torch.float32, False),
    "hard_weighted": ({"hard_negative_beta": 0.7}, torch.float32, False),
    "bf16": ({}, torch.bfloat16, False),
    "chunked_bf16": ({"chunk_size": 2}, torch.bfloat16, False),
    "autocast": ({}, torch.float32, True),
    "chunked_autocast": ({"chunk_size": 3}, torch.float32, True),
}


def _hard_inputs(sizes, dtype):
    """The global batch: queries, positive keys and H hard negatives a row (rounded to `dtype`)."""
    n = sum(sizes)
    return [x.to(dtype) for x in (_rand("hq", n, D), _rand("hk", n, D), _rand("hn", n, H, D))]


def _hard_negatives_worker(rank, world, sizes, out_dir):
    results = {}
    for name, (options, dtype, autocast) in HARD_VARIANTS.items():
        local = [_split(x, sizes, rank).clone().requires_grad_() for x in _hard_inputs(sizes, dtype)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = InfoNCELoss(0.1, **options)(local[0], local[1], hard_negatives=local[2])
        loss.backward()
        results[name] = (loss.detach(), [x.grad.float() for x in local], [x.grad.dtype for x in local])
    torch.save(results, f"{out_dir}/{rank}.pt")


@pytest.fixture(scope="module", params=[1, 2, 3])
def hard_negative_ranks(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"hard_world{world}")
    run_on_local_ranks(_hard_negatives_worker, world, HARD_SIZES[world], str(out_dir), timeout=180)
    return world, HARD_SIZES[world], [torch.load(out_dir / f"{r}.pt", weights_only=False) for r in range(world)]


def _mnrl_reference(q, k, negatives, temperature, decoupled=False, beta=0.0):
    """Independent of the loss: each query's softmax over [every positive, every row's every hard
    negative], its own positive the target (plain cross-entropy); with decoupled / beta, the
    weighted-negatives loop over the same candidates less its positive."""
    candidates = F.normalize(torch.cat([k, negatives.reshape(-1, k.shape[1])]), dim=1)
    logits = F.normalize(q, dim=1) @ candidates.T / temperature
    if not decoupled and beta == 0:
        return F.cross_entropy(logits, torch.arange(len(q)))
    pos = [[logits[i, i]] for i in range(len(q))]
    neg = [[logits[i, j] for j in range(len(candidates)) if j != i] for i in range(len(q))]
    return weighted_negatives_loop(q, pos, neg, beta, decoupled)


@pytest.mark.parametrize("name", HARD_VARIANTS)
def test_several_hard_negatives_a_row_equal_one_softmax_over_every_ranks_rows(hard_negative_ranks, name):
    """H = 3 hard negatives a row, gathered from every rank: the mean of the ranks' losses is the
    single-process loss of the global batch, and each rank's input gradients (/ W, DDP's mean) its
    slice of the reference's, for the positives and all H negatives of every row."""
    world, sizes, results = hard_negative_ranks
    options, dtype, _ = HARD_VARIANTS[name]
    inputs = [x.float().requires_grad_() for x in _hard_inputs(sizes, dtype)]  # the ranks' values, in fp32
    ref = _mnrl_reference(*inputs, 0.1, options.get("decoupled", False), options.get("hard_negative_beta", 0.0))
    ref_grads = torch.autograd.grad(ref, inputs)

    assert rel_err(sum(r[name][0] for r in results) / world, ref.detach()) < 1e-5
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 inputs: their gradients come back rounded to bf16
    for rank, r in enumerate(results):
        _, grads, dtypes = r[name]
        assert dtypes == [dtype] * 3
        assert grads[2].shape == (sizes[rank], H, D)
        for i, ref_grad in enumerate(ref_grads):
            assert rel_err(grads[i] / world, _split(ref_grad, sizes, rank)) < tol, (name, rank, i)
