"""Single-process losses against references: closed-form loops and the established libraries."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import (
    clip_loop,
    contrastive_pairs_loop,
    hcl_simclr,
    ntxent_loop,
    ntxent_weighted_loop,
    rel_err,
    siglip_loop,
    supcon_loop,
    weighted_negatives_loop,
)

from distributed_cl.losses import (
    ClipLoss,
    ContrastiveLoss,
    InfoNCELoss,
    Memory,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
    pair_labels,
)


def leaves(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def value_and_grads(fn, inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), grads


def assert_same(fn, ref_fn, inputs, tol=1e-5):
    loss, grads = value_and_grads(fn, inputs)
    ref_loss, ref_grads = value_and_grads(ref_fn, inputs)
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item()), (loss, ref_loss)
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) < tol


# ------------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_matches_closed_form(temperature):
    a, b = leaves((12, 8), (12, 8))
    assert_same(NTXentLoss(temperature), lambda x, y: ntxent_loop(x, y, temperature), [a, b])


def test_ntxent_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = leaves((16, 32), (16, 32), seed=1)
    assert_same(NTXentLoss(0.2), lightly_loss.NTXentLoss(temperature=0.2), [a, b])


def test_ntxent_with_labels_matches_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    (z,) = leaves((24, 16), seed=2)
    labels = torch.arange(6).repeat(4)  # every anchor has 3 positives: pml's mean over pairs = ours
    assert_same(lambda x: NTXentLoss(0.1)(x, labels=labels), lambda x: pml.NTXentLoss(0.1)(x, labels), [z])


def test_ntxent_two_views_with_labels_equals_single_set_call():
    a, b = leaves((10, 8), (10, 8), seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 3, 5])
    two_views = NTXentLoss()(a, b, labels=labels)
    stacked = NTXentLoss()(torch.cat([a, b]), labels=torch.cat([labels, labels]))
    torch.testing.assert_close(two_views, stacked)
    # unique labels reduce to plain SimCLR
    torch.testing.assert_close(NTXentLoss()(a, b, labels=torch.arange(10)), NTXentLoss()(a, b))


def test_self_supervised_pairs_agree_across_losses():
    """x[i] <-> y[i]: SimCLR NT-Xent is SupCon with each pair as its own class."""
    x, y = leaves((9, 8), (9, 8), seed=4)
    labels = torch.arange(9).repeat(2)
    torch.testing.assert_close(NTXentLoss(0.3)(x, y), SupConLoss(0.3)(torch.cat([x, y]), labels))


# ------------------------------------------------------------------------------- SupCon


def test_supcon_matches_closed_form_and_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    (z,) = leaves((20, 16), seed=5)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 6, 6, 6, 7, 8, 9, 9, 10, 11])  # some without positives
    assert_same(lambda x: SupConLoss(0.1)(x, labels), lambda x: supcon_loop(x, labels, 0.1), [z])
    assert_same(lambda x: SupConLoss(0.1)(x, labels), lambda x: pml.SupConLoss(0.1)(x, labels), [z])


def test_supcon_statistics():
    (z,) = leaves((6, 4))
    loss_fn = SupConLoss()
    loss, stats = loss_fn(z, torch.tensor([0, 0, 0, 1, 2, 2]), return_stats=True)
    assert (stats.anchors, stats.anchors_without_positive) == (6, 1) and not stats.empty
    assert stats.mean_positives == pytest.approx((2 + 2 + 2 + 1 + 1) / 5)
    assert stats.logged() == {"anchors_without_positive": 1, "mean_positives": stats.mean_positives}
    torch.testing.assert_close(loss, loss_fn(z, torch.tensor([0, 0, 0, 1, 2, 2])))  # the plain call: the loss alone
    assert loss_fn.last_stats == stats  # the last call's, kept for interactive use


def test_no_positives_gives_connected_zero_and_warns():
    (z,) = leaves((5, 4))
    loss_fn = SupConLoss()
    with pytest.warns(RuntimeWarning, match="no anchor"):
        loss, stats = loss_fn(z, torch.arange(5), return_stats=True)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))  # finite zeros, not NaN
    assert stats.empty and stats.anchors_without_positive == 5  # the loop counts it as an empty batch


def test_single_sample_batch_is_finite():
    (z,) = leaves((1, 4))
    with pytest.warns(RuntimeWarning):
        loss = SupConLoss()(z, torch.tensor([3]))
    loss.backward()
    assert torch.isfinite(z.grad).all()


# ------------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize(
    "mode,neg_shape",
    [("unpaired", None), ("unpaired", (7, 16)), ("paired", (10, 5, 16))],
)
def test_infonce_matches_info_nce_pytorch(mode, neg_shape):
    info_nce = pytest.importorskip("info_nce")
    shapes = [(10, 16), (10, 16)] + ([neg_shape] if neg_shape else [])
    inputs = leaves(*shapes, seed=6)
    ours = InfoNCELoss(0.1, negative_mode=mode)
    ref = info_nce.InfoNCE(0.1, negative_mode=mode)
    assert_same(ours, ref, inputs)


# ------------------------------------------------------------------------------- CLIP


def test_clip_matches_closed_form_including_logit_scale_grad():
    img, txt = leaves((8, 16), (8, 16), seed=7)
    ours = ClipLoss(temperature=0.07)
    loss = ours(img, txt)
    loss.backward()
    scale = torch.tensor(math.log(1 / 0.07)).requires_grad_()
    img2, txt2 = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    ref = clip_loop(img2, txt2, scale.exp())
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert rel_err(img.grad, img2.grad) < 1e-5 and rel_err(txt.grad, txt2.grad) < 1e-5
    assert ours.logit_scale.grad.item() == pytest.approx(scale.grad.item(), rel=1e-4)


def test_clip_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt = leaves((12, 32), (12, 32), seed=8)
    ours = ClipLoss(temperature=0.05)

    def reference(i, t):
        return open_clip_loss.ClipLoss()(F.normalize(i, dim=1), F.normalize(t, dim=1), torch.tensor(1 / 0.05))

    assert_same(ours, reference, [img, txt])


def test_clip_logit_scale_is_clamped_at_100():
    loss_fn = ClipLoss(temperature=0.001)
    assert loss_fn.scale.item() == pytest.approx(100.0)
    img, txt = leaves((4, 8), (4, 8))
    loss_fn(img, txt).backward()
    assert loss_fn.logit_scale.grad.item() == 0.0  # clamped: no push beyond the cap


# ------------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_margin_contrastive_loss_matches_closed_form(distance):
    x1, x2 = leaves((10, 8), (10, 8), seed=9)
    is_same = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    assert_same(
        lambda a, b: ContrastiveLoss(0.8, distance)(a, b, is_same),
        lambda a, b: contrastive_pairs_loop(a, b, is_same, 0.8, distance),
        [x1, x2],
    )


def test_pair_labels_make_positives_only_where_same():
    x1, x2 = leaves((6, 8), (6, 8), seed=10)
    is_same = torch.tensor([True, False, True, False, False, True])
    l1, l2 = pair_labels(is_same)
    z, labels = torch.cat([x1, x2]), torch.cat([l1, l2])
    loss_fn = SupConLoss(0.2)
    loss, stats = loss_fn(z, labels, return_stats=True)
    assert stats.anchors_without_positive == 2 * 3  # both members of 3 mismatched pairs
    # closed form: anchors are the 3 matching pairs' members, one positive each
    torch.testing.assert_close(loss, supcon_loop(z, labels, 0.2))


# ------------------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_siglip_matches_open_clip_including_scale_and_bias_grads(chunk_size):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt = leaves((10, 8), (10, 8), seed=21)
    ours = SigLipLoss(chunk_size=chunk_size)
    loss = ours(img, txt)
    grads = torch.autograd.grad(loss, [img, txt, ours.logit_scale, ours.logit_bias])
    log_scale, bias = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    ref = open_clip_loss.SigLipLoss()(F.normalize(img, dim=1), F.normalize(txt, dim=1), log_scale.exp(), bias)
    ref_grads = torch.autograd.grad(ref, [img, txt, log_scale, bias])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_siglip_matches_closed_form_away_from_its_initial_point():
    img, txt = leaves((6, 4), (6, 4), seed=22)
    loss = SigLipLoss(init_scale=3.0, init_bias=1.5)
    got = loss(img, txt)
    ref = siglip_loop(img, txt, torch.tensor(3.0), torch.tensor(1.5))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert loss.logged() == pytest.approx({"temperature": 1 / 3.0, "logit_bias": 1.5})
    assert tuple(loss.logged()) == SigLipLoss.log_keys  # metrics.csv's columns for it, known before training


def test_siglip_backward_twice_is_refused():
    img, txt = leaves((4, 8), (4, 8))
    loss = SigLipLoss()(img, txt)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()


# ------------------------------------------------------------------------------- DCL and HCL


def test_decoupled_ntxent_matches_lightly_dcl():
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = leaves((16, 32), (16, 32), seed=23)
    assert_same(NTXentLoss(0.2, decoupled=True), lightly_loss.DCLLoss(temperature=0.2), [a, b])


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_hard_negative_ntxent_matches_robinson_et_al(beta):
    a, b = leaves((12, 8), (12, 8), seed=24)
    assert_same(NTXentLoss(0.3, hard_negative_beta=beta), lambda x, y: hcl_simclr(x, y, 0.3, beta), [a, b])


@pytest.mark.parametrize("decoupled,beta", [(True, 0.0), (False, 0.7), (True, 0.7)])
def test_labelled_ntxent_options_match_the_loop(decoupled, beta):
    (z,) = leaves((14, 8), seed=25)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 4, 2, 5, 6, 6])  # 4 and 5 have no positive
    loss = NTXentLoss(0.2, decoupled=decoupled, hard_negative_beta=beta)
    assert_same(lambda x: loss(x, labels=labels), lambda x: ntxent_weighted_loop(x, labels, 0.2, beta, decoupled), [z])


def _infonce_loop(q, k, *extra, mode, temperature, beta, decoupled):
    def negatives(i):
        return {"in_batch": lambda: [k[j] for j in range(len(k)) if j != i], "unpaired": lambda: list(extra[0]),
                "paired": lambda: list(extra[0][i])}[mode]()
    pos = [[F.normalize(q[i], dim=0) @ F.normalize(k[i], dim=0) / temperature] for i in range(len(q))]
    neg = [[F.normalize(q[i], dim=0) @ F.normalize(n, dim=0) / temperature for n in negatives(i)] for i in range(len(q))]
    return weighted_negatives_loop(q, pos, neg, beta, decoupled)


@pytest.mark.parametrize("decoupled,beta", [(True, 0.0), (False, 0.7), (True, 0.7)])
@pytest.mark.parametrize("mode", ["in_batch", "unpaired", "paired"])
def test_infonce_options_match_the_loop(mode, decoupled, beta):
    q, k, pool, paired = leaves((9, 8), (9, 8), (5, 8), (9, 3, 8), seed=26)
    loss = InfoNCELoss(0.25, negative_mode="paired" if mode == "paired" else "unpaired", decoupled=decoupled,
                       hard_negative_beta=beta)
    extra = {"in_batch": [], "unpaired": [pool], "paired": [paired]}[mode]
    assert_same(lambda *x: loss(*x), lambda *x: _infonce_loop(*x, mode=mode, temperature=0.25, beta=beta, decoupled=decoupled),
                [q, k, *extra])


@pytest.mark.parametrize("h", [None, 1, 3])  # None: (n, d), one a row
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_infonce_hard_negatives_are_every_querys_negatives_as_sentence_transformers_mnrl(chunk_size, h):
    """MultipleNegativesRankingLoss with hard negatives: each query's softmax over every row's
    positive and every row's h hard negatives, its own positive the target."""
    q, k, negatives = leaves((7, 8), (7, 8), (7, 8) if h is None else (7, h, 8), seed=28)

    def mnrl(q, k, negatives):
        scores = F.normalize(q, dim=1) @ F.normalize(torch.cat([k, negatives.reshape(-1, 8)]), dim=1).T / 0.05
        return F.cross_entropy(scores, torch.arange(len(q)))

    loss = InfoNCELoss(0.05, chunk_size=chunk_size)
    assert_same(lambda *x: loss(x[0], x[1], hard_negatives=x[2]), mnrl, [q, k, negatives])
    with pytest.raises(ValueError, match="negative_keys or hard_negatives, not both"):
        InfoNCELoss()(q, k, k, hard_negatives=negatives)
    with pytest.raises(ValueError, match=r"hard_negatives must have shape \(batch, dim\) or \(batch, h, dim\)"):
        InfoNCELoss()(q, k, hard_negatives=negatives.reshape(7, 1, 1, -1))


def test_infonce_with_three_hard_negatives_a_row_is_sentence_transformers_mnrl():
    """The library itself: MNRL's loss from the embeddings (anchors, positives, negative_1..3), scale 1 / temperature."""
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    q, k, negatives = leaves((6, 8), (6, 8), (6, 3, 8), seed=29)
    mnrl = st_losses.MultipleNegativesRankingLoss(None, scale=20.0)

    def reference(q, k, negatives):
        return mnrl.compute_loss_from_embeddings([q, k, *negatives.unbind(1)], None)

    assert_same(lambda *x: InfoNCELoss(0.05)(x[0], x[1], hard_negatives=x[2]), reference, [q, k, negatives])


def test_plain_options_give_the_plain_loss():
    a, b = leaves((12, 8), (12, 8), seed=27)
    assert_same(NTXentLoss(0.3, decoupled=False, hard_negative_beta=0.0), lambda x, y: ntxent_loop(x, y, 0.3), [a, b])


# ------------------------------------------------------------------------------- precision and errors


@pytest.mark.parametrize(
    "make",
    [
        lambda a, b: NTXentLoss()(a, b),
        lambda a, b: SupConLoss()(torch.cat([a, b]), torch.arange(len(a)).repeat(2)),
        lambda a, b: InfoNCELoss()(a, b),
        lambda a, b: ClipLoss()(a, b),
        lambda a, b: SigLipLoss()(a, b),
        lambda a, b: NTXentLoss(decoupled=True, hard_negative_beta=0.5)(a, b),
    ],
)
def test_bf16_inputs_are_finite_and_close_to_fp32(make):
    a, b = leaves((64, 32), (64, 32), seed=11)
    loss32 = make(a, b)
    a16, b16 = (x.detach().bfloat16().requires_grad_() for x in (a, b))
    loss16 = make(a16, b16)
    loss16.backward()
    assert loss16.dtype == torch.float32  # logits and log-sum-exp in fp32
    assert torch.isfinite(a16.grad.float()).all()
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)


MEMORY = Memory(*(x.detach() for x in leaves((16, 32), (16, 32), seed=14)), torch.arange(16) % 8)
EVERY_LOSS = {
    "ntxent": lambda a, b: NTXentLoss()(a, b),
    "ntxent_labels": lambda a, b: NTXentLoss()(a, b, labels=torch.arange(len(a)) % 8),
    "ntxent_single_set": lambda a, b: NTXentLoss()(torch.cat([a, b]), labels=torch.arange(2 * len(a)) % 8),
    "supcon": lambda a, b: SupConLoss()(torch.cat([a, b]), torch.arange(len(a)).repeat(2)),
    "infonce": lambda a, b: InfoNCELoss()(a, b),
    "infonce_unpaired": lambda a, b: InfoNCELoss()(a, b, b.roll(1, 0)[:16] * 2),
    "infonce_paired": lambda a, b: InfoNCELoss(negative_mode="paired")(a, b, torch.stack([b.roll(1, 0), b.roll(2, 0)], 1)),
    "clip": lambda a, b: ClipLoss()(a, b),
    "siglip": lambda a, b: SigLipLoss()(a, b),
    "siglip_chunked": lambda a, b: SigLipLoss(chunk_size=24)(a, b),
    "ntxent_decoupled_hard": lambda a, b: NTXentLoss(decoupled=True, hard_negative_beta=0.5)(a, b),
    "ntxent_labels_hard": lambda a, b: NTXentLoss(hard_negative_beta=0.5)(a, b, labels=torch.arange(len(a)) % 8),
    "infonce_decoupled_hard": lambda a, b: InfoNCELoss(decoupled=True, hard_negative_beta=0.5)(a, b),
    "contrastive": lambda a, b: ContrastiveLoss()(a, b, torch.arange(len(a)) % 2),
    # the queue's keys (constants, fp32 like the queue keeps them) and per-row hard negatives
    "ntxent_memory": lambda a, b: NTXentLoss()(a, b, memory=MEMORY),
    "supcon_memory": lambda a, b: SupConLoss()(torch.cat([a, b]), torch.arange(len(a)).repeat(2) % 8, memory=MEMORY),
    "clip_memory": lambda a, b: ClipLoss()(a, b, memory=MEMORY),
    "infonce_hard_negatives": lambda a, b: InfoNCELoss()(a, b, hard_negatives=b.roll(1, 0) + a),
    "infonce_three_hard_negatives": lambda a, b: InfoNCELoss()(a, b, hard_negatives=torch.stack(
        [b.roll(1, 0) + a, b.roll(2, 0) - a, a.roll(1, 0) * 2], dim=1)),
}


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", EVERY_LOSS)
def test_every_loss_under_cpu_autocast_is_finite_and_close_to_fp32(name, input_dtype):
    """--use-gpu trains under bf16 autocast: the loss must keep fp32 logits (a float32-min mask
    written into autocast's bf16 logits overflowed here before)."""
    make = EVERY_LOSS[name]
    a, b = leaves((64, 32), (64, 32), seed=13)
    ref_loss, ref_grads = value_and_grads(make, [a, b])
    inputs = [x.detach().to(input_dtype).requires_grad_() for x in (a, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = make(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    tol = 1e-5 if input_dtype == torch.float32 else 2e-2  # fp32 inputs: autocast must not touch the loss at all
    assert loss.item() == pytest.approx(ref_loss.item(), rel=tol)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == input_dtype and torch.isfinite(g.float()).all()
        assert rel_err(g.float(), ref) < (1e-4 if input_dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: NTXentLoss()(torch.randn(4, 8), torch.randn(5, 8)), "4 rows but view_b has 5"),
        (lambda: NTXentLoss()(torch.randn(4, 8), torch.randn(4, 6)), "dim 6, expected 8"),
        (lambda: NTXentLoss()(torch.randn(4, 8, 2), torch.randn(4, 8, 2)), r"shape \(batch, dim\)"),
        (lambda: NTXentLoss()(torch.randn(4, 8)), "needs view_b, labels"),
        (lambda: SupConLoss()(torch.randn(4, 8), torch.tensor([0.0, 1.0, 0.0, 1.0])), "integer class ids"),
        (lambda: SupConLoss()(torch.randn(4, 8), torch.tensor([0, 1, 0])), r"labels must have shape \(4,\)"),
        (lambda: SupConLoss()(torch.full((4, 8), float("nan")), torch.zeros(4, dtype=torch.long)), "NaN or inf"),
        (lambda: SupConLoss()(torch.ones(4, 8, dtype=torch.long), torch.zeros(4, dtype=torch.long)), "floating-point"),
        (lambda: SupConLoss(temperature=0), "temperature must be"),
        (lambda: ClipLoss(temperature=-0.1), "temperature must be"),
        (lambda: InfoNCELoss(negative_mode="both"), "negative_mode"),
        (lambda: InfoNCELoss(negative_mode="paired")(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 2, 8)), "paired"),
        (lambda: InfoNCELoss()(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8)), "unpaired"),
        (lambda: ContrastiveLoss()(torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 2, 1])), "is_same"),
        (lambda: SigLipLoss(init_scale=0), "init_scale must be"),
        (lambda: SigLipLoss(init_bias=float("nan")), "init_bias must be"),
        (lambda: SigLipLoss()(torch.randn(4, 8), torch.randn(3, 8)), "4 rows but text_emb has 3"),
        (lambda: NTXentLoss(hard_negative_beta=-1), "hard_negative_beta must be"),
        (lambda: InfoNCELoss(decoupled="yes"), "decoupled must be"),
    ],
)
def test_bad_input_raises_a_named_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_losses_do_not_warn_in_normal_use():
    a, b = leaves((8, 4), (8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NTXentLoss()(a, b).backward()


def test_huge_losses_stay_exact_when_target_probability_underflows():
    """Temperature 0.005 and positives pointing away: -log p would read inf; rows are recomputed."""
    g = torch.Generator().manual_seed(12)
    a = torch.randn(6, 8, generator=g)
    b = -a + 0.01 * torch.randn(6, 8, generator=g)  # each positive is the anchor's antipode
    assert_same(NTXentLoss(0.005), lambda x, y: ntxent_loop(x, y, 0.005), [a, b], tol=1e-4)
    loss = NTXentLoss(0.005)(a, b)
    assert torch.isfinite(loss) and loss.item() > -math.log(1e-30)  # the fallback ran
    clip = ClipLoss(temperature=0.01)  # scale 100
    img = a.clone().requires_grad_()
    loss = clip(img, b)
    ref = clip_loop(a, b, torch.tensor(100.0))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and ref.item() > -math.log(1e-30)


def test_clip_graph_backward_twice_is_refused():
    img, txt = leaves((4, 8), (4, 8))
    loss = ClipLoss()(img, txt)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
