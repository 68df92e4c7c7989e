"""Representation quality: weighted kNN top-1 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def knn_top1(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int = 20,
             temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy of a cosine kNN classifier whose k neighbours vote with weight
    exp(similarity / temperature) (Wu et al. 2018, the usual SSL monitor)."""
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError("knn_top1 needs a non-empty bank and query set")
    bank = F.normalize(bank.float(), dim=1)
    num_classes = int(bank_labels.max()) + 1
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start : start + chunk]).sum().item()
    return correct / len(queries)


@torch.no_grad()
def embed(encoder: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Encoder features of float images (n, C, H, W), in eval mode."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = torch.cat([encoder(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])
    encoder.train(was_training)
    return out
