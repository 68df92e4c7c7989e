"""The two GEMM paths of every gathered loss (core.gemm_dtype_for): fp32 operands (CPU, and CUDA
with fp32 embeddings and no autocast) and half-precision operands with fp32 accumulation (CUDA
with bf16/fp16 embeddings or autocast). Here the half path runs on CPU with the same operand
rounding (core.mm); the CUDA tests at the end run it on tensor cores where a GPU is present."""

import pytest
import torch
from reference import clip_loop, ntxent_loop, rel_err, supcon_loop

from distributed_cl.losses import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss, core

N, D = 48, 32


def inputs(dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    return a.to(device, dtype), b.to(device, dtype)


LABELS = torch.arange(N).repeat(2) % 12
# name: (loss(chunk_size), call, fp64 reference of the same value)
LOSSES = {
    "ntxent": (lambda c: NTXentLoss(0.1, chunk_size=c), lambda m, a, b: m(a, b), lambda a, b: ntxent_loop(a, b, 0.1)),
    "supcon": (lambda c: SupConLoss(0.1, chunk_size=c), lambda m, a, b: m(torch.cat([a, b]), LABELS),
               lambda a, b: supcon_loop(torch.cat([a, b]), LABELS, 0.1)),
    "clip": (lambda c: ClipLoss(0.05, learn_temperature=False, chunk_size=c), lambda m, a, b: m(a, b),
             lambda a, b: clip_loop(a, b, torch.tensor(20.0, dtype=torch.float64))),
}


def errors(name, chunk_size, device="cpu"):
    """(value, gradient) relative errors of the loss against its fp64 reference."""
    make, call, reference = LOSSES[name]
    a64, b64 = (x.requires_grad_() for x in inputs())
    ref = reference(a64, b64)
    ref_grads = torch.autograd.grad(ref, (a64, b64))
    a, b = (x.detach().to(device, torch.float32).requires_grad_() for x in (a64, b64))
    loss = call(make(chunk_size).to(device), a, b)
    grads = torch.autograd.grad(loss, (a, b))
    grad_err = max(rel_err(g.cpu().double(), r) for g, r in zip(grads, ref_grads))
    return rel_err(loss.detach().cpu().double(), ref.detach()), grad_err


@pytest.fixture
def bf16_operands(monkeypatch):
    """The CUDA half path's choice, made on CPU: GEMM operands rounded to bf16."""
    monkeypatch.setattr(core, "gemm_dtype_for", lambda device_type, input_dtype: torch.bfloat16)


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("name", LOSSES)
def test_fp32_operands_are_exact_to_fp32_rounding(name, chunk_size):
    value_err, grad_err = errors(name, chunk_size)
    assert value_err < 1e-6 and grad_err < 1e-5


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("name", LOSSES)
def test_bf16_operands_keep_fp32_softmax_accuracy_within_bf16_rounding(name, chunk_size, bf16_operands):
    value_err, grad_err = errors(name, chunk_size)
    # measured: values 6e-6 to 4e-5, gradients 8e-4 to 2.4e-3 (bf16 keeps 8 bits, 4e-3 per operand)
    assert value_err < 2e-4 and grad_err < 1e-2
    assert grad_err > 1e-4  # the operands really were rounded (fp32 operands: 3e-7)


def test_tiled_and_untiled_agree_with_bf16_operands(bf16_operands):
    """To bf16 rounding: the tiled losses take their positives' logits from fp32 operands."""
    a, b = inputs(torch.float32)
    for make, call, _ in LOSSES.values():
        torch.testing.assert_close(call(make(None), a, b), call(make(7), a, b), rtol=2e-4, atol=0)
    q, k, neg = inputs(torch.float32) + (inputs(torch.float32)[0][:20],)
    torch.testing.assert_close(InfoNCELoss()(q, k, neg), InfoNCELoss(chunk_size=6)(q, k, neg), rtol=2e-4, atol=0)


def test_gemm_dtype_follows_the_device_inputs_and_autocast():
    assert core.gemm_dtype_for("cpu", torch.bfloat16) is None  # CPU keeps exact fp32 GEMMs
    assert core.gemm_dtype_for("cuda", torch.float32) is None  # fp32 without autocast: unchanged
    assert core.gemm_dtype_for("cuda", torch.bfloat16) == torch.bfloat16
    assert core.gemm_dtype_for("cuda", torch.float16) == torch.float16


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("chunk_size", [None, 4096])
@pytest.mark.parametrize("name", LOSSES)
def test_cuda_bf16_inputs_take_tensor_cores_and_stay_accurate(name, chunk_size):
    make, call, reference = LOSSES[name]
    a64, b64 = inputs()
    ref = reference(a64, b64).item()
    a, b = (x.cuda().bfloat16() for x in inputs())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = call(make(chunk_size).cuda(), a.float(), b.float())  # autocast alone selects bf16
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref, rel=4e-3)
    loss = call(make(chunk_size).cuda(), a, b)
    assert loss.item() == pytest.approx(ref, rel=4e-3)
    value_err, grad_err = errors(name, chunk_size, device="cuda")  # fp32 on CUDA: the exact path (TF32 off)
    assert value_err < 1e-5 and grad_err < 1e-4
