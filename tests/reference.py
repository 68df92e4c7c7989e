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


def siglip_loop(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP: sum over every (i, j) of -log sigmoid(z_ij (scale i.t + bias)), z = 1 iff i == j, / n."""
    i, t = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    terms = [-F.logsigmoid((1.0 if k == j else -1.0) * (scale * i[k] @ t[j] + bias)) for k in range(len(i)) for j in range(len(t))]
    return torch.stack(terms).sum() / len(i)


def weighted_negatives_loop(anchors, positives, negatives, beta: float, decoupled: bool) -> torch.Tensor:
    """Mean over anchors k (and over each of its positives p) of -log(e^l_p / (e^l_p + Ng)), or
    -log(e^l_p / Ng) when decoupled, with HCL's Ng = M sum_j e^((1+beta) l_j) / sum_j e^(beta l_j)
    over anchor k's M negatives (Robinson et al.'s estimator without debiasing). `positives[k]`
    and `negatives[k]` are lists of logits of anchor k; anchors without positives are skipped."""
    terms = []
    for k in range(len(anchors)):
        if not positives[k]:
            continue
        neg = torch.stack(negatives[k])
        ng = len(neg) * torch.exp((1 + beta) * neg).sum() / torch.exp(beta * neg).sum()
        per_positive = [-(p - torch.log(ng)) if decoupled else -(p - torch.log(torch.exp(p) + ng)) for p in positives[k]]
        terms.append(torch.stack(per_positive).mean())
    return torch.stack(terms).mean()


def ntxent_weighted_loop(z: torch.Tensor, labels: torch.Tensor, temperature: float, beta: float,
                         decoupled: bool) -> torch.Tensor:
    """NT-Xent over one labelled set: positives share a label (not the anchor itself), negatives don't."""
    z = F.normalize(z, dim=1)
    logit = [[z[k] @ z[j] / temperature for j in range(len(z))] for k in range(len(z))]
    pos = [[logit[k][j] for j in range(len(z)) if j != k and labels[j] == labels[k]] for k in range(len(z))]
    neg = [[logit[k][j] for j in range(len(z)) if labels[j] != labels[k]] for k in range(len(z))]
    return weighted_negatives_loop(z, pos, neg, beta, decoupled)


def hcl_simclr(out_1: torch.Tensor, out_2: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """The hard-negative SimCLR loss as Robinson et al. (2021) wrote it (tau_plus = 0), vectorised."""
    out_1, out_2 = F.normalize(out_1, dim=1), F.normalize(out_2, dim=1)
    b = len(out_1)
    out = torch.cat([out_1, out_2])
    neg = torch.exp(out @ out.T / temperature)
    mask = ~torch.eye(b, dtype=torch.bool).repeat(2, 2)  # neither the anchor nor its other view
    neg = neg.masked_select(mask).view(2 * b, -1)
    pos = torch.exp((out_1 * out_2).sum(-1) / temperature).repeat(2)
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    return (-torch.log(pos / (pos + reweight_neg))).mean()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x - ref).double()) / max(float(torch.linalg.vector_norm(ref.double())), 1e-30))


__all__ = ["ntxent_loop", "clip_loop", "supcon_loop", "contrastive_pairs_loop", "siglip_loop", "weighted_negatives_loop",
           "ntxent_weighted_loop", "hcl_simclr", "rel_err"]
