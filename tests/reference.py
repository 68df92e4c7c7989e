"""Independent references written as plain loops over anchors: slow, obvious, no shared code."""

import torch
import torch.nn.functional as F


def ntxent_loop(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR: anchor k of [a; b] has positive (k + n) mod 2n; softmax over all but itself."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n2 = len(z)
    terms = []
    for k in range(n2):
        pos = (k + n2 // 2) % n2
        sims = torch.stack([z[k] @ z[j] / temperature for j in range(n2) if j != k])
        terms.append(torch.logsumexp(sims, 0) - z[k] @ z[pos] / temperature)
    return torch.stack(terms).mean()


def clip_loop(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(mean_i CE(row i, i) + mean_j CE(column j, j)) / 2 on S = scale * img @ txt.T."""
    i, t = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    n = len(i)
    rows = [torch.logsumexp(torch.stack([scale * i[k] @ t[j] for j in range(n)]), 0) - scale * i[k] @ t[k] for k in range(n)]
    cols = [torch.logsumexp(torch.stack([scale * i[j] @ t[k] for j in range(n)]), 0) - scale * i[k] @ t[k] for k in range(n)]
    return (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2


def supcon_loop(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al. L_out: mean over anchors with positives of -mean_p log softmax_p."""
    z = F.normalize(z, dim=1)
    terms = []
    for k in range(len(z)):
        others = [j for j in range(len(z)) if j != k]
        pos = [j for j in others if labels[j] == labels[k]]
        if not pos:
            continue
        lse = torch.logsumexp(torch.stack([z[k] @ z[j] / temperature for j in others]), 0)
        terms.append(torch.stack([lse - z[k] @ z[p] / temperature for p in pos]).mean())
    return torch.stack(terms).mean()


def contrastive_pairs_loop(x1, x2, is_same, margin: float, distance: str) -> torch.Tensor:
    terms = []
    for u, v, y in zip(F.normalize(x1, dim=1), F.normalize(x2, dim=1), is_same):
        d = 1 - u @ v if distance == "cosine" else torch.linalg.vector_norm(u - v)
        terms.append(0.5 * (d**2 if y else torch.clamp(margin - d, min=0) ** 2))
    return torch.stack(terms).mean()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x - ref).double()) / max(float(torch.linalg.vector_norm(ref.double())), 1e-30))


__all__ = ["ntxent_loop", "clip_loop", "supcon_loop", "contrastive_pairs_loop", "rel_err"]
