"""Precision of the losses' two GEMM paths against float64: value and gradient relative errors.

    python experiments/loss_precision.py        # CPU; on a machine with CUDA also the GPU rows

fp32 operands: CPU, and CUDA with fp32 embeddings and no autocast. bf16 operands, fp32
accumulation and output: CUDA with bf16/fp16 embeddings or under autocast (torch.mm out_dtype);
on CPU the same operand rounding is applied (distributed_cl.losses.core.mm), so these rows show
the path's arithmetic, not a GPU's speed. Softmax and log-sum-exp are fp32 in both. The fp64
reference is each loss's definition written with autograd in float64.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl.losses import ClipLoss, NTXentLoss, SupConLoss, core  # noqa: E402

N, D, T = 1024, 128, 0.1


def reference(name: str, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 definitions: NT-Xent over 2N embeddings, SupCon on [a; b], CLIP with scale 1/T."""
    if name == "clip":
        logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / T
        targets = torch.arange(len(a))
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = (z @ z.T / T).fill_diagonal_(float("-inf"))
    log_prob = logits.log_softmax(1)
    if name == "ntxent":
        return -log_prob.diagonal(offset=len(a)).sum().add(log_prob.diagonal(offset=-len(a)).sum()) / len(z)
    y = torch.cat([labels, labels])
    positive = (y[:, None] == y[None, :]).fill_diagonal_(False)
    return -(torch.where(positive, log_prob, 0.0).sum(1) / positive.sum(1)).mean()


def loss_module(name: str, chunk_size: int | None):
    if name == "clip":
        return ClipLoss(T, learn_temperature=False, chunk_size=chunk_size)
    return {"ntxent": NTXentLoss, "supcon": SupConLoss}[name](T, chunk_size=chunk_size)


def errors(name: str, chunk_size: int | None, device: str, half: bool) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    a64, b64 = (torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    labels = torch.randint(0, 64, (N,), generator=g)
    ref = reference(name, a64, b64, labels)
    ref_grads = torch.autograd.grad(ref, (a64, b64))
    a, b = (x.detach().to(device, torch.float32).requires_grad_() for x in (a64, b64))
    module = loss_module(name, chunk_size).to(device)
    chosen = core.gemm_dtype_for
    if half and device == "cpu":  # the CUDA half path's operand rounding, on CPU
        core.gemm_dtype_for = lambda device_type, input_dtype: torch.bfloat16
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=half and device == "cuda"):
            loss = module(a, b) if name != "supcon" else module(torch.cat([a, b]), torch.cat([labels, labels]).to(device))
    finally:
        core.gemm_dtype_for = chosen
    grads = torch.autograd.grad(loss, (a, b))

    def rel(x, y):
        return float((x.detach().cpu().double() - y).norm() / y.norm())

    return rel(loss, ref.detach()), max(rel(g_, r) for g_, r in zip(grads, ref_grads))


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"n={N}, d={D}, T={T}; relative errors against float64 (gradient: the worse of the two inputs)\n")
    print("| loss | GEMM operands | device | plain: value | plain: gradient | chunked: value | chunked: gradient |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in ("ntxent", "supcon", "clip"):
        for half in (False, True):
            for device in devices:
                plain, chunked = errors(name, None, device, half), errors(name, 256, device, half)
                operands = "bf16, fp32 accumulate" if half else "fp32"
                print(f"| {name} | {operands} | {device} | {plain[0]:.1e} | {plain[1]:.1e} | "
                      f"{chunked[0]:.1e} | {chunked[1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
