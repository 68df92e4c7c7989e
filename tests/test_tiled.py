"""chunk_size: every gathered loss computed in tiles gives the untiled loss's value and gradients
(fp32 to 1e-6, bf16 inputs and autocast too), and never holds an (n x N) matrix. The 2-4 rank
cases, unequal and empty local batches included, are in test_distributed.py."""

import math
import warnings

import pytest
import torch
from reference import ntxent_loop, rel_err

from distributed_cl.losses import ClipLoss, InfoNCELoss, Memory, NTXentLoss, SigLipLoss, SupConLoss
from distributed_cl.profiling import LargestTensors


def paired_negatives(b):
    return torch.stack([b.roll(1, 0), b.roll(2, 0)], 1)


def past_keys(a, b):
    """A queue's memory: constants (detached), here shaped from the inputs, with labels."""
    return Memory(a[:9].detach().flip(1), b[:9].detach().roll(3, 1), torch.arange(9) % 5)


# name: (loss class and kwargs, call). Each call takes (loss, a, b).
GATHERED = {
    "ntxent": (NTXentLoss, {"temperature": 0.2}, lambda m, a, b: m(a, b)),
    "ntxent_labels": (NTXentLoss, {}, lambda m, a, b: m(a, b, labels=torch.arange(len(a)) % 5)),
    "ntxent_single_set": (NTXentLoss, {}, lambda m, a, b: m(torch.cat([a, b]), labels=torch.arange(2 * len(a)) % 7)),
    "ntxent_two_classes": (NTXentLoss, {}, lambda m, a, b: m(torch.cat([a, b]), labels=torch.arange(2 * len(a)) % 2)),
    "supcon": (SupConLoss, {}, lambda m, a, b: m(torch.cat([a, b]), torch.arange(len(a)).repeat(2))),
    "supcon_sparse": (  # two thirds of the anchors have no positive
        SupConLoss, {"temperature": 0.3}, lambda m, a, b: m(torch.cat([a, b]), torch.arange(2 * len(a)) % (3 * len(a) // 2))),
    "infonce": (InfoNCELoss, {}, lambda m, a, b: m(a, b)),
    "infonce_unpaired": (InfoNCELoss, {}, lambda m, a, b: m(a, b, b.roll(1, 0) * 2)),
    "infonce_paired": (InfoNCELoss, {"negative_mode": "paired"}, lambda m, a, b: m(a, b, paired_negatives(b))),
    "clip": (ClipLoss, {"temperature": 0.05}, lambda m, a, b: m(a, b)),
    "siglip": (SigLipLoss, {"init_scale": 5.0, "init_bias": -2.0}, lambda m, a, b: m(a, b)),
    "ntxent_decoupled_hard": (NTXentLoss, {"decoupled": True, "hard_negative_beta": 0.5}, lambda m, a, b: m(a, b)),
    "ntxent_labels_decoupled": (NTXentLoss, {"decoupled": True}, lambda m, a, b: m(a, b, labels=torch.arange(len(a)) % 5)),
    "ntxent_labels_hard": (NTXentLoss, {"hard_negative_beta": 1.0}, lambda m, a, b: m(a, b, labels=torch.arange(len(a)) % 5)),
    "infonce_decoupled_hard": (InfoNCELoss, {"decoupled": True, "hard_negative_beta": 0.5}, lambda m, a, b: m(a, b)),
    "infonce_unpaired_hard": (InfoNCELoss, {"hard_negative_beta": 0.5}, lambda m, a, b: m(a, b, b.roll(1, 0) * 2)),
    "ntxent_memory": (NTXentLoss, {"hard_negative_beta": 0.5}, lambda m, a, b: m(a, b, memory=past_keys(a, b))),
    "supcon_memory": (SupConLoss, {}, lambda m, a, b: m(torch.cat([a, b]), torch.arange(len(a)).repeat(2) % 5,
                                                          memory=past_keys(a, b))),
    "clip_memory": (ClipLoss, {"temperature": 0.05}, lambda m, a, b: m(a, b, memory=past_keys(a, b))),
    "infonce_hard_negatives": (InfoNCELoss, {}, lambda m, a, b: m(a, b, hard_negatives=b.roll(1, 0) * 2)),
}
LEARNT = {"clip": 1, "siglip": 2, "clip_memory": 1}  # the losses' own parameters: logit_scale (and SigLIP's logit_bias)


def run(name, inputs, chunk_size=None, autocast=False):
    cls, kwargs, call = GATHERED[name]
    module = cls(**kwargs, chunk_size=chunk_size)
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = call(module, *inputs)
    loss.backward()
    return loss.detach(), [x.grad for x in inputs] + [p.grad for p in module.parameters()]


def leaves(n=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)]


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("name", GATHERED)
def test_chunked_equals_untiled_in_fp32(name, chunk_size):
    inputs = leaves()
    ref_loss, ref_grads = run(name, inputs)
    loss, grads = run(name, inputs, chunk_size)
    assert rel_err(loss, ref_loss) < 1e-6
    assert len(grads) == len(ref_grads) == 2 + LEARNT.get(name, 0)
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) < 1e-6


@pytest.mark.parametrize("regime", ["bf16_inputs", "autocast", "bf16_inputs_autocast"])
@pytest.mark.parametrize("name", GATHERED)
def test_chunked_equals_untiled_with_bf16_inputs_and_autocast(name, regime):
    inputs = leaves(seed=1)
    if regime.startswith("bf16"):
        inputs = [x.bfloat16() for x in inputs]
    ref_loss, ref_grads = run(name, inputs, autocast="autocast" in regime)
    loss, grads = run(name, inputs, chunk_size=5, autocast="autocast" in regime)
    assert loss.dtype == torch.float32 and rel_err(loss, ref_loss) < 1e-6
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == ref.dtype and rel_err(g.float(), ref.float()) < 1e-5  # bf16 grads: rounding of each


def test_chunked_stays_exact_where_target_probabilities_underflow():
    g = torch.Generator().manual_seed(12)
    a = torch.randn(6, 8, generator=g)
    b = -a + 0.01 * torch.randn(6, 8, generator=g)  # each positive is the anchor's antipode
    loss = NTXentLoss(0.005, chunk_size=4)(a, b)
    ref = ntxent_loop(a, b, 0.005)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and ref.item() > -math.log(1e-30)


def test_empty_batch_and_no_positives_are_connected_zeros_as_untiled():
    for chunk_size in (None, 3):
        z = torch.randn(0, 8, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="no anchor"):
            loss = NTXentLoss(chunk_size=chunk_size)(z, z)
        loss.backward()
        assert loss.item() == 0.0 and z.grad.shape == (0, 8)
        z = torch.randn(6, 8, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="no anchor"):
            loss = SupConLoss(chunk_size=chunk_size)(z, torch.arange(6))
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros(6, 8))


def test_a_row_without_negatives_costs_nothing_as_untiled():
    z, labels = torch.randn(5, 8), torch.tensor([0, 0, 0, 0, 1])  # rows 0-3 have one negative, row 4 none
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = NTXentLoss()(z, labels=labels)
        got = NTXentLoss(chunk_size=2)(z, labels=labels)
    assert torch.isfinite(got) and rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_bad_chunk_size_is_named(bad):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
        NTXentLoss(chunk_size=bad)


@pytest.mark.parametrize("name", GATHERED)
def test_chunked_never_makes_an_n_by_n_matrix(name):
    n, d, chunk = 128, 8, 32
    inputs = leaves(n, d, seed=2)
    sizes = {}
    for chunk_size in (None, chunk):
        with LargestTensors() as largest:
            run(name, inputs, chunk_size)
        sizes[chunk_size] = largest.numel
    if name == "infonce_paired":  # no N-wide logits to tile: n x 2 negatives per query
        assert sizes[chunk] == sizes[None]
        return
    assert sizes[None] >= n * n  # the untiled loss holds its logits
    # tiles, embeddings and their gradients only (with a memory: its 2 x 9 keys beside the 2n views)
    assert sizes[chunk] <= max((2 * n + 18) * d, chunk * chunk)
