"""Gradient caching: one step equals the whole-batch step (fp32, 1e-5), dropout active, for every
loss, on 1 and 2 gloo ranks under DDP, under autocast, and with BatchNorm's per-chunk choice.

"The whole-batch step" with dropout: the loss of the whole batch, its towers run chunk by chunk
with autograd, so that dropout draws its masks in the order gradient caching draws them (one
pass over the whole batch would assign them to other rows: another, equally valid, sample).
Without dropout it is the plain one-pass step, compared too.
"""

import functools

import pytest
import torch
from reference import rel_err
from test_tasks import CONFIGS
from test_train_cli import DIGITS
from torch import nn

from distributed_cl.config import Config
from distributed_cl.distributed import run_on_local_ranks
from distributed_cl.grad_cache import chunk_rows, grad_cache_backward, split_batch, take_rows
from distributed_cl.losses import ClipLoss, ContrastiveLoss, InfoNCELoss, NTXentLoss, SigLipLoss, SupConLoss
from distributed_cl.losses.ntxent import NTXentOptions
from distributed_cl.losses.pairs import ContrastiveOptions
from distributed_cl.losses.supcon import SupConOptions
from distributed_cl.samplers import DistributedRandomBatchSampler
from distributed_cl.tasks import TASKS, ContrastiveModel

LOSSES = {
    "ntxent": (lambda: NTXentLoss(0.2), NTXentOptions()),
    "supcon": (lambda: SupConLoss(0.2), SupConOptions()),
    "infonce": (lambda: InfoNCELoss(0.2), NTXentOptions()),
    "clip": (lambda: ClipLoss(0.1), NTXentOptions()),  # its logit_scale gradient comes from the cached loss
    "ntxent_chunked": (lambda: NTXentLoss(0.2, chunk_size=5), NTXentOptions()),
    "siglip": (lambda: SigLipLoss(5.0, -2.0), NTXentOptions()),  # logit_scale and logit_bias from the cached loss
    "ntxent_decoupled_hard": (lambda: NTXentLoss(0.2, decoupled=True, hard_negative_beta=0.5), NTXentOptions()),
    # rows that carry h hard negatives (embedded by side b's tower; h = 1 and 2) or pair labels
    "infonce_hard_negatives": (lambda: InfoNCELoss(0.2), NTXentOptions(), ("negative",)),
    "infonce_two_hard_negatives": (lambda: InfoNCELoss(0.2), NTXentOptions(), ("negative", "negative")),
    "supcon_pair_labels": (lambda: SupConLoss(0.2), SupConOptions(), ("is_same",)),
    "contrastive_pairs": (lambda: ContrastiveLoss(0.5), ContrastiveOptions(), ("is_same",)),
}


class Towers(nn.Module):
    """Two towers, one dropout layer each (and optionally BatchNorm)."""

    def __init__(self, dropout: float = 0.3, batch_norm: bool = False):
        super().__init__()

        def tower(d_in):
            norm = nn.BatchNorm1d(16) if batch_norm else nn.Identity()
            return nn.Sequential(nn.Linear(d_in, 16), norm, nn.Dropout(dropout), nn.Tanh(), nn.Linear(16, 8))

        self.a, self.b = tower(6), tower(5)

    def forward(self, x_a, x_b):
        return self.a(x_a), self.b(x_b)

    def embed_b(self, x_b):
        return self.b(x_b)


def model(loss="ntxent", seed=0, **towers):
    torch.manual_seed(seed)
    make_loss, objective, *_ = LOSSES[loss]
    return ContrastiveModel(Towers(**towers), make_loss(), objective)


def batch(n=24, seed=1, loss="ntxent"):
    g = torch.Generator().manual_seed(seed)
    data = {"a": torch.randn(n, 6, generator=g), "b": torch.randn(n, 5, generator=g),
            "labels": torch.randint(0, 4, (n,), generator=g)}
    extras = LOSSES[loss][2] if len(LOSSES[loss]) > 2 else ()
    if "negative" in extras:  # side b's input of h negatives a row: (n, h, ...), as pair_extras collates it
        data["negative"] = torch.randn(n, extras.count("negative"), 5, generator=g)
    if "is_same" in extras:
        data["is_same"] = torch.randint(0, 2, (n,), generator=g)
    return data


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def whole_batch_loss(net, batch, chunk_size, autocast=no_autocast):
    """The whole batch's loss and its statistics, its towers run chunk by chunk with autograd
    (dropout masks drawn in chunk order, each chunk's texts cut to its longest, as gradient caching
    draws and cuts them)."""
    with autocast():
        parts = [net.embed(take_rows(batch, rows, trim=True)) for rows in chunk_rows(batch, chunk_size)]
        return net.loss([torch.cat(zs) for zs in zip(*parts)], batch)


def grads(net):
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def assert_same_grads(got, ref, tol=1e-5):
    """Every gradient within `tol` of the reference, relative to its own norm or, for one that is
    zero in exact arithmetic (a key bias's: softmax ignores it), to a thousandth of the largest."""
    assert got.keys() == ref.keys()
    scale = max(float(g.float().norm()) for g in ref.values())
    for name in ref:
        error = float((got[name].float() - ref[name].float()).norm())
        assert error <= tol * max(float(ref[name].float().norm()), 1e-3 * scale), (name, error)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_step_equals_the_whole_batch_step_with_dropout(loss):
    cached, reference, data = model(loss), model(loss), batch(loss=loss)
    torch.manual_seed(7)
    cached_loss, cached_stats = grad_cache_backward(cached, cached, data, 5, no_autocast)  # chunks of 5, 5, 5, 5, 4
    torch.manual_seed(7)
    ref_loss, ref_stats = whole_batch_loss(reference, data, 5)
    ref_loss.backward()
    assert rel_err(cached_loss, ref_loss.detach()) < 1e-6
    assert cached_stats == ref_stats  # the statistics of the whole batch, not of a chunk
    assert_same_grads(grads(cached), grads(reference))
    assert "loss_fn.logit_scale" in grads(cached) or loss != "clip"
    for net in (cached, reference):  # and the optimizer step that follows
        torch.optim.SGD(net.parameters(), lr=0.5).step()
    for p, q in zip(cached.parameters(), reference.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-5


@pytest.mark.parametrize("loss", ["ntxent", "infonce_two_hard_negatives"])
def test_without_dropout_it_equals_the_plain_one_pass_step(loss):
    """Against one pass over the whole batch: chunks of 7 rows take their rows' negatives (14 of them)."""
    cached, plain, data = model(loss, dropout=0.0), model(loss, dropout=0.0), batch(loss=loss)
    grad_cache_backward(cached, cached, data, 7, no_autocast)
    plain(data)[0].backward()
    assert_same_grads(grads(cached), grads(plain))


def test_restoring_each_chunks_rng_state_is_what_makes_it_exact(monkeypatch):
    """Break the restore: the second pass draws new dropout masks and the gradient is wrong."""
    import distributed_cl.grad_cache as gc

    cached, reference, data = model(), model(), batch()
    monkeypatch.setattr(gc, "_set_rng_state", lambda state: None)
    torch.manual_seed(7)
    grad_cache_backward(cached, cached, data, 6, no_autocast)
    torch.manual_seed(7)
    whole_batch_loss(reference, data, 6)[0].backward()
    assert rel_err(grads(cached)["towers.a.0.weight"], grads(reference)["towers.a.0.weight"]) > 1e-3


def test_autocast_applies_to_both_passes():
    cached, reference, data = model("clip"), model("clip"), batch()
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    passes = []  # (autograd on, output dtype) of every tower call
    cached.towers.register_forward_hook(lambda m, args, out: passes.append((torch.is_grad_enabled(), out[0].dtype)))
    torch.manual_seed(3)
    grad_cache_backward(cached, cached, data, 8, autocast)
    assert passes == [(False, torch.bfloat16)] * 3 + [(True, torch.bfloat16)] * 3
    torch.manual_seed(3)
    whole_batch_loss(reference, data, 8, autocast)[0].backward()
    # bf16 matmuls: each chunk's weight gradient is rounded to bf16 before the chunks are summed,
    # where the reference rounds the whole sum once
    assert_same_grads(grads(cached), grads(reference), tol=1e-2)


def test_batch_norm_uses_each_chunks_statistics_and_updates_its_running_ones_once_per_chunk():
    cached, reference, data = model(batch_norm=True), model(batch_norm=True), batch()
    torch.manual_seed(5)
    grad_cache_backward(cached, cached, data, 8, no_autocast)
    torch.manual_seed(5)
    whole_batch_loss(reference, data, 8)[0].backward()  # BatchNorm sees the same chunks
    assert_same_grads(grads(cached), grads(reference))
    bn, ref_bn = cached.towers.a[1], reference.towers.a[1]
    assert bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == 3  # not 6: pass 1 undone
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


@pytest.mark.parametrize("towers", ["image", "text", "image_text", "hf_clip", "open_clip", "hf_clip tiled"])
def test_every_tasks_towers_take_the_whole_batch_step(towers, tiny_bert, tiny_clip, tiny_open_clip):  # noqa: F811
    """The real towers: a CNN with BatchNorm (image, and image_text's image side), a transformer
    with dropout in every layer (text, image_text's text side), CLIP's learnable temperature, and
    the pretrained CLIPs, their own logit scale in the loss (one of them with the tiled loss)."""
    image_text = CONFIGS / "image_text_tiny.yaml"
    hf_clip = ["image_text.towers=hf_clip", f"image_text.pretrained={tiny_clip}"]
    config_file, overrides = {"image": (DIGITS, []),
                              "text": (CONFIGS / "text_tiny.yaml", [f"text.tower.model={tiny_bert}"]),
                              "image_text": (image_text, [f"image_text.text_tower.model={tiny_bert}"]),
                              "hf_clip": (image_text, hf_clip),
                              "open_clip": (image_text, tiny_open_clip["overrides"]),
                              "hf_clip tiled": (image_text, [*hf_clip, "loss.chunk_size=5"])}[towers]
    task_name = Config.load(config_file, overrides).task
    config = Config.load(config_file, overrides)
    task = TASKS[task_name](config)
    torch.manual_seed(0)
    data = next(iter(task.train_batches(DistributedRandomBatchSampler(len(task.data.train), 16, 1, 0))))
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(ContrastiveModel(task.build_towers(config), config.loss.build(), config.loss))
    cached, reference = nets
    torch.manual_seed(1)
    grad_cache_backward(cached, cached, data, 6, no_autocast)
    torch.manual_seed(1)
    whole_batch_loss(reference, data, 6)[0].backward()
    assert_same_grads(grads(cached), grads(reference))


# ----------------------------------------------------------------------------- 2 ranks, DDP

LOCAL = [10, 10]  # the M-per-class sampler gives every rank the same share


def _ddp_worker(rank, world, loss, out_dir):
    net = model(loss)
    ddp = nn.parallel.DistributedDataParallel(net)
    data = {k: v[sum(LOCAL[:rank]) : sum(LOCAL[: rank + 1])] for k, v in batch(sum(LOCAL), loss=loss).items()}
    torch.manual_seed(100 + rank)
    loss_value, _ = grad_cache_backward(ddp, net, data, 4, no_autocast)
    torch.optim.SGD(net.parameters(), lr=0.5).step()
    torch.save((loss_value, {k: p.detach() for k, p in net.named_parameters()}), f"{out_dir}/{rank}.pt")


@pytest.mark.parametrize("loss", ["ntxent", "clip", "supcon", "infonce_two_hard_negatives"])
def test_two_ranks_under_ddp_equal_the_single_process_whole_batch_step(tmp_path, loss):
    run_on_local_ranks(_ddp_worker, 2, loss, str(tmp_path), timeout=120)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # single process: the global batch, each rank's chunks with that rank's dropout masks
    reference, data = model(loss), batch(sum(LOCAL), loss=loss)
    parts = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        local = {k: v[sum(LOCAL[:rank]) : sum(LOCAL[: rank + 1])] for k, v in data.items()}
        parts += [reference.embed(c) for c in split_batch(local, 4)]  # z_a, z_b (and the rows' negatives)
    ref_loss, _ = reference.loss([torch.cat(zs) for zs in zip(*parts)], data)
    ref_loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    assert rel_err(sum(r[0] for r in results) / 2, ref_loss.detach()) < 1e-5
    for name, p in reference.named_parameters():
        for rank in range(2):  # DDP averaged once: every rank took the same step
            assert rel_err(results[rank][1][name], p.detach()) < 1e-5, (name, rank)


# ----------------------------------------------------------------------------- token budget


def test_token_budget_chunks_sort_by_length_and_keep_within_the_budget():
    from test_fsdp import batch as text_batch

    from distributed_cl.grad_cache import chunk_rows, take_rows

    data = text_batch(24)  # texts of 3 to 9 tokens a side, padded to 10
    chunks = chunk_rows(data, None, 60)
    assert sorted(torch.cat(chunks).tolist()) == list(range(24))  # every row once
    lengths = data["a"]["attention_mask"].sum(1) + data["b"]["attention_mask"].sum(1)
    firsts = [lengths[c].max() for c in chunks]
    assert firsts == sorted(firsts, reverse=True)  # the longest rows first
    for rows in chunks:
        chunk = take_rows(data, rows, trim=True)
        padded = len(rows) * (chunk["a"]["input_ids"].shape[1] + chunk["b"]["input_ids"].shape[1])
        assert padded <= 60 or len(rows) == 1
        assert (chunk["a"]["attention_mask"][:, -1] == 1).any()  # trimmed to the chunk's longest text
    assert len(chunks) > len(chunk_rows(data, None, 200))  # a smaller budget, more chunks
    assert [len(c) for c in chunk_rows(data, 3, 10_000)] == [3] * 8  # and at most grad_cache_chunk rows
    assert len(chunk_rows(data, None, 60, count=len(chunks) + 3)) == len(chunks) + 3  # FSDP's equal count


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_token_budget_chunks_take_the_whole_batch_step(dropout):
    """Without dropout, the plain one-pass step on the padded batch; with it, the loss of the rows
    embedded chunk by chunk in the budget's order (their masks), back in the batch's order."""
    from test_fsdp import batch as text_batch
    from test_fsdp import model as text_model

    from distributed_cl.grad_cache import chunk_rows, take_rows

    cached, reference, data = text_model("infonce", dropout), text_model("infonce", dropout), text_batch(24)
    torch.manual_seed(5)
    grad_cache_backward(cached, cached, data, None, no_autocast, chunk_tokens=60)
    torch.manual_seed(5)
    if dropout:
        chunks = chunk_rows(data, None, 60)
        parts = [reference.embed(take_rows(data, rows, trim=True)) for rows in chunks]
        order = torch.cat(chunks).argsort()
        reference.loss([torch.cat(zs)[order] for zs in zip(*parts)], data)[0].backward()
    else:
        reference(data)[0].backward()
    from test_fsdp import assert_close_to

    assert_close_to(grads(cached), grads(reference))
