"""The negative queue: each loss with past keys as extra candidates against plain loops; the queue
FIFO, the same on every rank, through the real train_step; the momentum encoder's EMA; and an
exact resume of queue and momentum encoder from a saved state. (The 2-4 rank gradients of the
losses with a memory are test_distributed.py's.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import rel_err, weighted_negatives_loop
from torch import nn

from distributed_cl.distributed import run_on_local_ranks
from distributed_cl.losses import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss
from distributed_cl.losses.core import Memory
from distributed_cl.losses.ntxent import NTXentOptions
from distributed_cl.queue import KeyQueue, NegativeQueue
from distributed_cl.tasks import ContrastiveModel
from distributed_cl.train_loop import Progress, restore_state, rng_state, save_state, train_step

D = 6


def keys(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def memory(q: int = 5, classes: int = 3, seed: int = 50) -> Memory:
    return Memory(keys(seed, q, D), keys(seed + 1, q, D), torch.arange(q) % classes)


def value_and_grads(fn, inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def assert_same(fn, ref_fn, inputs, tol=1e-5):
    loss, grads = value_and_grads(fn, inputs)
    ref_loss, ref_grads = value_and_grads(ref_fn, inputs)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=tol)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < tol


def logit(u, v, t):
    return F.normalize(u, dim=0) @ F.normalize(v, dim=0) / t


# ----------------------------------------------------------------------------- the losses with a memory


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("decoupled,beta", [(False, 0.0), (True, 0.5)])
def test_ntxent_scores_every_anchor_against_the_memory_too(chunk_size, decoupled, beta):
    mem, t = memory(), 0.3
    extra = torch.cat([mem.a, mem.b])

    def reference(a, b):
        z = torch.cat([a, b])
        n = len(a)
        pos = [[logit(z[k], z[(k + n) % (2 * n)], t)] for k in range(2 * n)]
        neg = [[logit(z[k], z[j], t) for j in range(2 * n) if j % n != k % n] + [logit(z[k], e, t) for e in extra]
               for k in range(2 * n)]
        return weighted_negatives_loop(z, pos, neg, beta, decoupled)

    loss = NTXentLoss(t, chunk_size=chunk_size, decoupled=decoupled, hard_negative_beta=beta)
    assert_same(lambda a, b: loss(a, b, memory=mem), reference, [keys(1, 7, D), keys(2, 7, D)])


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_labelled_ntxent_finds_positives_in_the_memory_xbm(chunk_size):
    mem, t = memory(), 0.2
    labels = torch.tensor([0, 1, 1, 2, 5, 0])  # 2 and 5 have no positive in the batch; 5 has none at all
    extra, extra_labels = mem.both()

    def reference(z):
        cand, cand_labels = torch.cat([z, extra]), torch.cat([labels, extra_labels])
        pos = [[logit(z[k], cand[j], t) for j in range(len(cand)) if j != k and cand_labels[j] == labels[k]]
               for k in range(len(z))]
        neg = [[logit(z[k], cand[j], t) for j in range(len(cand)) if cand_labels[j] != labels[k]] for k in range(len(z))]
        return weighted_negatives_loop(z, pos, neg, 0.0, False)

    loss = NTXentLoss(t, chunk_size=chunk_size)
    assert_same(lambda z: loss(z, labels=labels, memory=mem), reference, [keys(3, 6, D)])
    _, stats = loss(keys(3, 6, D), labels=labels, memory=mem, return_stats=True)
    assert stats.anchors_without_positive == 1  # only 5: 2's positive is in the memory


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_supcon_with_the_memory_is_the_loop_over_batch_anchors_and_all_candidates(chunk_size):
    mem = memory()
    labels = torch.tensor([0, 1, 1, 2, 7, 0, 2])
    extra, extra_labels = mem.both()

    def reference(z):  # Khosla et al.'s L_out over the batch's anchors; candidates: the batch and the memory
        zn, all_labels = F.normalize(torch.cat([z, extra]), dim=1), torch.cat([labels, extra_labels])
        terms = []
        for k in range(len(z)):
            others = [j for j in range(len(zn)) if j != k]
            pos = [j for j in others if all_labels[j] == labels[k]]
            if pos:
                lse = torch.logsumexp(torch.stack([zn[k] @ zn[j] / 0.1 for j in others]), 0)
                terms.append(torch.stack([lse - zn[k] @ zn[p] / 0.1 for p in pos]).mean())
        return torch.stack(terms).mean()

    loss = SupConLoss(0.1, chunk_size=chunk_size)
    assert_same(lambda z: loss(z, labels, memory=mem), reference, [keys(4, 7, D)])


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_infonce_takes_the_memory_keys_as_negatives_moco(chunk_size):
    mem, t = memory(), 0.25

    def reference(q, k):
        pos = [[logit(q[i], k[i], t)] for i in range(len(q))]
        neg = [[logit(q[i], k[j], t) for j in range(len(k)) if j != i] + [logit(q[i], e, t) for e in mem.b]
               for i in range(len(q))]
        return weighted_negatives_loop(q, pos, neg, 0.0, False)

    assert_same(lambda q, k: InfoNCELoss(t, chunk_size=chunk_size)(q, k, memory=mem), reference,
                [keys(5, 6, D), keys(6, 6, D)])
    # with given negatives, the memory joins them
    pool = keys(7, 4, D)

    def with_pool(q, k):
        pos = [[logit(q[i], k[i], t)] for i in range(len(q))]
        neg = [[logit(q[i], e, t) for e in torch.cat([pool, mem.b])] for i in range(len(q))]
        return weighted_negatives_loop(q, pos, neg, 0.0, False)

    assert_same(lambda q, k: InfoNCELoss(t, chunk_size=chunk_size)(q, k, pool, memory=mem), with_pool,
                [keys(5, 6, D), keys(6, 6, D)])


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_clip_gives_image_rows_the_memory_texts_and_text_rows_the_memory_images(chunk_size):
    mem, scale = memory(), 1 / 0.1

    def reference(img, txt):
        n = len(img)
        rows = [torch.logsumexp(torch.stack([logit(img[i], c, 0.1) for c in torch.cat([txt, mem.b])]), 0)
                - logit(img[i], txt[i], 0.1) for i in range(n)]
        cols = [torch.logsumexp(torch.stack([logit(txt[j], c, 0.1) for c in torch.cat([img, mem.a])]), 0)
                - logit(img[j], txt[j], 0.1) for j in range(n)]
        return (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2

    loss = ClipLoss(1 / scale, learn_temperature=False, chunk_size=chunk_size)
    assert_same(lambda i, t: loss(i, t, memory=mem), reference, [keys(8, 5, D), keys(9, 5, D)])


# ----------------------------------------------------------------------------- the queue


def test_the_queue_is_a_fifo_of_the_last_size_keys():
    queue = KeyQueue(5)
    assert queue.memory() is None
    for step in range(3):  # 3 keys a step: the queue wraps after the second
        queue.push(keys(step, 3, D), keys(step + 10, 3, D), torch.full((3,), step))
    mem = queue.memory()
    newest = F.normalize(torch.cat([keys(s, 3, D) for s in range(3)])[-5:], dim=1)  # the oldest overwritten first
    assert sorted(map(tuple, mem.a.tolist())) == sorted(map(tuple, newest.tolist()))
    assert sorted(mem.labels.tolist()) == [1, 1, 2, 2, 2]
    assert queue.filled == 5
    big = KeyQueue(2)
    big.push(keys(0, 4, D), keys(1, 4, D), torch.arange(4))  # a batch larger than the queue keeps its last keys
    assert sorted(big.memory().labels.tolist()) == [2, 3]


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, D), nn.Linear(3, D)

    def forward(self, x_a, x_b):
        return self.a(x_a), self.b(x_b)


def batch_of(step: int, rank: int, n: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {"a": torch.randn(n, 4, generator=g), "b": torch.randn(n, 3, generator=g),
            "labels": torch.randint(0, 3, (n,), generator=g)}


def trainer(momentum: float, size: int = 12):
    torch.manual_seed(0)
    net = ContrastiveModel(Towers(), NTXentLoss(0.2), NTXentOptions())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    return net, optimizer, NegativeQueue(size, momentum, net.towers)


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def _train_ranks(rank, world, sizes, momentum, steps, out_dir):
    """`steps` real train_steps under DDP with unequal local batches; at half-time the state is
    saved and restored into fresh objects (a resume); rank 0 saves its queue after every step."""
    import os

    from ray.train import Checkpoint

    os.makedirs(out_dir, exist_ok=True)
    net, optimizer, negatives = trainer(momentum)
    ddp = nn.parallel.DistributedDataParallel(net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    history = []
    for step in range(steps):
        if step == steps // 2:
            save_state(out_dir, net, optimizer, scheduler, Progress(), [rng_state()] * world, negatives)
            net, optimizer, negatives = trainer(momentum)
            ddp = nn.parallel.DistributedDataParallel(net)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            restore_state(Checkpoint.from_directory(out_dir), net, optimizer, scheduler, rank, torch.device("cpu"),
                          negatives, world)
        train_step(ddp, net, optimizer, batch_of(step, rank, sizes[rank]), no_autocast, scheduler, negatives=negatives)
        history.append(copy.deepcopy(negatives.queue.state_dict()))
    key_towers = negatives.key_towers.module.state_dict() if momentum else None
    return {"history": history, "key_towers": key_towers, "towers": net.towers.state_dict()}


def single_process(sizes, momentum, steps):
    """The same steps in one process on the concatenated global batches."""
    net, optimizer, negatives = trainer(momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    history = []
    for step in range(steps):
        parts = [batch_of(step, r, n) for r, n in enumerate(sizes)]
        batch = {k: torch.cat([p[k] for p in parts]) for k in ("a", "b", "labels")}
        train_step(net, net, optimizer, batch, no_autocast, scheduler, negatives=negatives)
        history.append(copy.deepcopy(negatives.queue.state_dict()))
    return history, negatives


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_queue_is_the_same_on_every_rank_and_resumes_exactly(momentum, tmp_path):
    sizes, steps = [3, 1, 2], 6  # unequal local batches: 6 keys a step, the queue of 12 wraps
    run_on_local_ranks(_collect, 3, sizes, momentum, steps, str(tmp_path), timeout=180)
    ranks = [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(3)]
    reference, negatives = single_process(sizes, momentum, steps)
    for step in range(steps):
        for rank in range(3):
            got = ranks[rank]["history"][step]
            assert got["filled"] == reference[step]["filled"] == min(6 * (step + 1), 12)
            assert torch.equal(got["labels"], reference[step]["labels"])
            torch.testing.assert_close(got["a"], reference[step]["a"], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got["b"], reference[step]["b"], atol=1e-6, rtol=1e-5)
    if momentum:
        for rank in range(3):
            for name, value in negatives.key_towers.module.state_dict().items():
                torch.testing.assert_close(ranks[rank]["key_towers"][name], value, atol=1e-6, rtol=1e-5)


def _collect(rank, world, sizes, momentum, steps, out_dir):
    torch.save(_train_ranks(rank, world, sizes, momentum, steps, f"{out_dir}/rank{rank}"), f"{out_dir}/result{rank}.pt")


def test_the_momentum_encoder_is_an_ema_of_the_towers_updated_after_each_step():
    net, optimizer, negatives = trainer(0.9, size=16)
    start = {n: p.detach().clone() for n, p in net.towers.named_parameters()}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    train_step(net, net, optimizer, batch_of(0, 0, 8), no_autocast, scheduler, negatives=negatives)
    after_one = {n: p.detach().clone() for n, p in net.towers.named_parameters()}
    ema = dict(negatives.key_towers.module.named_parameters())
    for n in start:  # the first update copies the towers
        torch.testing.assert_close(ema[n], after_one[n])
    train_step(net, net, optimizer, batch_of(1, 0, 8), no_autocast, scheduler, negatives=negatives)
    for n, p in net.towers.named_parameters():
        torch.testing.assert_close(ema[n], 0.9 * after_one[n] + 0.1 * p.detach())
    # the second step's keys came from the momentum encoder, not the towers
    with torch.no_grad():
        k_a, _ = negatives.key_towers.module(batch_of(1, 0, 8)["a"], batch_of(1, 0, 8)["b"])
    newest = negatives.queue.a[8:16]
    torch.testing.assert_close(newest, F.normalize(k_a, dim=1))
