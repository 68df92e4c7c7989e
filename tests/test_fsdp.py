"""train.strategy=fsdp: FSDP2 shards a transformer tower's blocks over gloo ranks, and a step takes
the single-process whole-batch step (the one DDP takes), with and without gradient caching,
with unequal local batches and chunks, the tiled loss, activation checkpointing, LoRA (a text
tower's, a CLIP's two towers'), a learnt temperature kept whole, and gradient clipping; sharded
checkpoints reload on another number of ranks. (The Ray Train run under FSDP, a worker killed,
is test_llm_towers.py's.) Dropout is on: each rank draws its masks chunk by chunk, and the reference draws the same
ones (seeded per rank, chunk by chunk, as test_grad_cache.py's reference does)."""

import pytest
import torch
from reference import rel_err
from torch import nn
from torch.distributed.fsdp import FSDPModule

from distributed_cl.distributed import run_on_local_ranks
from distributed_cl.grad_cache import chunk_rows, grad_cache_backward, take_rows
from distributed_cl.losses import ClipLoss, InfoNCELoss
from distributed_cl.losses.ntxent import NTXentOptions
from distributed_cl.models.clip import HFClipTowers
from distributed_cl.models.text import TextTower, TextTowerOptions
from distributed_cl.sharding import (
    activation_checkpointing,
    average_replicated_grads,
    clip_grad_norm_,
    full_state_dict,
    fully_shard_model,
    load_shards,
    save_shards,
    shard_blocks,
)
from distributed_cl.tasks import ContrastiveModel
from distributed_cl.tasks.image_text import ImageTextOptions
from distributed_cl.tasks.text import SiameseText

BERT = {"model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 16}
LOSSES = {"infonce": lambda: InfoNCELoss(0.1), "infonce_tiled": lambda: InfoNCELoss(0.1, chunk_size=5),
          "clip": lambda: ClipLoss(0.1)}  # CLIP learns its temperature: a parameter FSDP leaves whole
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
CLIP = {"text_config": {**TOWER, "vocab_size": 64, "max_position_embeddings": 16, "eos_token_id": 63},
        "vision_config": {**TOWER, "image_size": 16, "patch_size": 8}, "projection_dim": 16}


def model(loss: str, dropout: float = 0.1, lora: bool = False, towers: str = "text") -> ContrastiveModel:
    """Towers of a BERT text encoder for both sides, or with towers="clip" a transformers CLIP
    (whose logit scale the CLIP loss trains), LoRA on both of its towers at ranks of their own."""
    torch.manual_seed(0)
    if towers == "clip":
        adapters = {"r": 4, "alpha": 8, "dropout": dropout} if lora else None
        options = ImageTextOptions(towers="hf_clip", pretrained="tiny", image_tower={"lora": adapters},
                                   text_tower={"lora": adapters and {**adapters, "r": 2}})
        net = HFClipTowers(options, {"model_type": "clip", "clip": CLIP, "mean": [0.5] * 3, "std": [0.5] * 3})
    else:
        options = TextTowerOptions(lora={"r": 4, "alpha": 8, "dropout": dropout} if lora else None)
        net = SiameseText(TextTower(options, architecture={**BERT, "hidden_dropout_prob": dropout,
                                                           "attention_probs_dropout_prob": dropout}))
    if lora:  # LoRA's B starts at zero: a step from there would not show its A's gradient
        for name, p in net.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return ContrastiveModel(net, LOSSES[loss](), NTXentOptions()).train()


def batch(n: int, towers: str = "text") -> dict:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 10, (2, n), generator=g)  # padded texts: the mask matters

    def tokens(side):
        mask = (torch.arange(10) < lengths[side, :, None]).long()
        return {"input_ids": torch.randint(1, 64, (n, 10), generator=g) * mask, "attention_mask": mask}

    if towers == "text":
        return {"a": tokens(0), "b": tokens(1), "labels": torch.arange(n)}
    captions = tokens(1)  # a CLIP's text tower reads its end-of-text token's state: one ends every caption
    captions["input_ids"].scatter_(1, lengths[1, :, None] - 1, 63)
    return {"a": torch.rand(n, 3, 16, 16, generator=g), "b": captions, "labels": torch.arange(n)}


def rows(data, start: int, stop: int):
    return {k: rows(v, start, stop) if isinstance(v, dict) else v[start:stop] for k, v in data.items()}


def local(data, sizes, rank):
    return rows(data, sum(sizes[:rank]), sum(sizes[: rank + 1]))


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def _fsdp_step(rank, world, loss, sizes, chunk, checkpointing, clip, lora=False, tokens=None, towers="text"):
    """One FSDP step on this rank's share: the whole gradients (gathered) and weights after SGD."""
    net = model(loss, lora=lora, towers=towers)
    if checkpointing:
        activation_checkpointing(net.towers)
    fully_shard_model(net, list(net.loss_fn.parameters()), torch.device("cpu"))
    assert sum(isinstance(m, FSDPModule) for m in net.modules()) >= 4  # its blocks (2 a tower), tables and root
    data = local(batch(sum(sizes), towers), sizes, rank)
    torch.manual_seed(100 + rank)
    if chunk or tokens:
        grad_cache_backward(net, net, data, chunk, no_autocast, tokens)
    else:
        net(data)[0].backward()
    average_replicated_grads(net)
    if clip:
        clip_grad_norm_(list(net.parameters()), clip)
    grads = whole_grads(net)
    torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5).step()
    return grads, full_state_dict(net)


def whole_grads(net: nn.Module) -> dict:
    """Every gradient, sharded ones gathered, by parameter name (checkpointing's wrapper left out)."""
    return {name.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
            else p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def reference_step(loss, sizes, chunk, clip, lora=False, tokens=None, towers="text"):
    """The single-process step on the global batch: each rank's rows embedded with that rank's
    dropout masks (chunk by chunk, in the chunks every rank runs), one loss over all of them."""
    net, data = model(loss, lora=lora, towers=towers), batch(sum(sizes), towers)
    shares = [local(data, sizes, rank) for rank in range(len(sizes))]
    count = max(len(chunk_rows(mine, chunk, tokens)) for mine in shares) if chunk or tokens else 1
    embeddings = []
    for rank, mine in enumerate(shares):
        torch.manual_seed(100 + rank)
        chunks = chunk_rows(mine, chunk, tokens, count) if chunk or tokens else [torch.arange(sizes[rank])]
        parts = [net.embed(take_rows(mine, rows, trim=bool(chunk or tokens))) for rows in chunks]
        order = torch.cat(chunks).argsort()  # the rank's rows back in order
        embeddings.append([torch.cat(z)[order] for z in zip(*parts)])
    net.loss([torch.cat(z) for z in zip(*embeddings)], data)[0].backward()
    if clip:
        nn.utils.clip_grad_norm_(net.parameters(), clip)
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5).step()
    return grads, net.state_dict()


def assert_close_to(got: dict, ref: dict, tol: float = 1e-5) -> None:
    """Every tensor within `tol` of the reference, relative to its own norm or, for a gradient
    that is zero in exact arithmetic (a key bias's: softmax ignores it), to the largest one's."""
    assert got.keys() == ref.keys()
    scale = max(float(v.float().norm()) for v in ref.values())
    for name in ref:
        error = float((got[name].float() - ref[name].float()).norm())
        assert error <= tol * max(float(ref[name].float().norm()), 1e-3 * scale), (name, error)


CASES = {  # local batches (one a rank), chunk, activation checkpointing, loss, grad clip, LoRA, token budget, towers
    "2 ranks: unequal chunks, a learnt temperature, clipped": ([7, 5], 3, False, "clip", 0.05),
    "3 ranks: unequal batches, no chunks, tiled loss, checkpointing": ([5, 4, 4], None, True, "infonce_tiled", 0.0),
    "3 ranks: token-budget chunks, tiled loss, LoRA": ([6, 5, 6], None, False, "infonce_tiled", 0.0, True, 40),
    "2 ranks: a CLIP's towers with LoRA, unequal chunks, its logit scale": ([5, 4], 2, False, "clip", 0.0, True, None,
                                                                           "clip"),
}


@pytest.mark.parametrize("case", CASES)
def test_an_fsdp_step_equals_the_single_process_whole_batch_step(case):
    defaults = (False, None, "text")  # lora, tokens, towers where a case leaves them out
    sizes, chunk, checkpointing, loss, clip, lora, tokens, towers = (*CASES[case], *defaults[len(CASES[case]) - 5:])
    grads, weights = run_on_local_ranks(_fsdp_step, len(sizes), loss, sizes, chunk, checkpointing, clip, lora, tokens,
                                        towers, timeout=180)
    ref_grads, ref_weights = reference_step(loss, sizes, chunk, clip, lora, tokens, towers)
    assert_close_to(grads, ref_grads)
    assert_close_to(weights, ref_weights)
    scale = next((g for name, g in grads.items() if name.endswith("logit_scale")), None)
    assert (scale is not None and scale.abs() > 0) == (loss == "clip")  # averaged over the ranks, not left to one
    if lora:  # only the adapters (and a learnt scale) have gradients: on both of a CLIP's towers
        assert all("lora_" in name or name.endswith("logit_scale") for name in grads), sorted(grads)[:3]
        assert {"vision_model" in name for name in grads if "lora_" in name} == ({True, False} if towers == "clip"
                                                                                   else {False})


def _ddp_step(rank, world, loss, sizes, chunk):
    net = model(loss)
    ddp = nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(100 + rank)
    grad_cache_backward(ddp, net, local(batch(sum(sizes)), sizes, rank), chunk, no_autocast)
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def test_fsdp_and_ddp_take_the_same_gradient_caching_step():
    """The two strategies side by side on the same equal local batches (what the loop feeds them)."""
    sizes, chunk = [6, 6], 4
    fsdp, _ = run_on_local_ranks(_fsdp_step, 2, "clip", sizes, chunk, False, 0.0, timeout=180)
    ddp = run_on_local_ranks(_ddp_step, 2, "clip", sizes, chunk, timeout=180)
    assert_close_to(fsdp, ddp)


def _momentum_steps(rank, world, directory, steps, sizes, save_after=None):
    """SGD steps with momentum (a state to reshard) on the global batch, without dropout (the masks
    would differ with the rank count): with `save_after`, the shards saved after that many steps;
    without, loaded first. The whole weights at the end."""
    net = model("clip", dropout=0.0)
    fully_shard_model(net, list(net.loss_fn.parameters()), torch.device("cpu"))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    data = local(batch(12), sizes, rank)
    if save_after is None:
        load_shards(directory, net, optimizer)
    for step in range(steps):
        if step == save_after:
            save_shards(directory, net, optimizer)
        optimizer.zero_grad()
        net(data)[0].backward()
        average_replicated_grads(net)
        optimizer.step()
    return full_state_dict(net)


def test_sharded_checkpoints_reload_on_another_number_of_ranks(tmp_path):
    """Saved by 2 ranks after 2 steps, loaded by 3: their step (the momentum resharded too) is
    the third step of the 2 ranks. (SGD, not Adam: Adam would scale a key bias's gradient, zero
    but for rounding, into a step of the learning rate's size.)"""
    straight = run_on_local_ranks(_momentum_steps, 2, str(tmp_path), 3, [6, 6], 2, timeout=180)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = run_on_local_ranks(_momentum_steps, 3, str(tmp_path), 1, [4, 4, 4], timeout=180)
    assert_close_to(resumed, straight)
    fresh = full_state_dict_of(model("clip", dropout=0.0))
    assert max(rel_err(resumed[k], fresh[k]) for k in fresh) > 1e-3  # it did train


def full_state_dict_of(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_blocks_are_the_transformer_layers():
    net = model("infonce")
    # what the model's own _no_split_modules names: its layers, and its embeddings (one unit)
    assert [type(b).__name__ for b in shard_blocks(net)] == ["BertEmbeddings", "BertLayer", "BertLayer"]
    from distributed_cl.models.image import SmallCNN

    assert shard_blocks(SmallCNN()) == []
    with pytest.raises(ValueError, match="no repeated transformer blocks to shard"):
        fully_shard_model(SmallCNN(), [], torch.device("cpu"))
