"""Decoder-only embedders and LoRA on a tiny random Qwen3 (built offline from its config, with
MiniLM's tokenizer): last-token pooling with left padding, each side's prompt, the
sentence-transformers export that carries both, adapters that alone train and export for peft,
checkpoints of the adapters alone, and the errors before Ray starts; end to end, a sharded LoRA
run on 2 Ray Train workers that loses one and resumes from its shards as an uninterrupted DDP run
trains (the project's one Ray Train run under FSDP)."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from test_tasks import CONFIGS, logged, run_train

from distributed_cl.config import Config, ConfigError
from distributed_cl.losses import InfoNCELoss
from distributed_cl.losses.ntxent import NTXentOptions
from distributed_cl.models.lora import merged, save_adapters
from distributed_cl.models.text import TextTokenizer, TextTower, TextTowerOptions, save_sentence_transformer
from distributed_cl.optim import OPTIMIZERS, param_groups
from distributed_cl.tasks import ContrastiveModel
from distributed_cl.tasks.text import SiameseText
from distributed_cl.train_loop import load_trainable_state, trainable_state

TEXTS = ["a dog", "the quick brown fox jumps over the lazy dog, again and again", "to run", "a word for a thing"]
PROMPTS = {"a": "Instruct: find the example of this definition\nQuery: ", "b": "Example: "}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def tower(tiny_qwen3, **options) -> tuple[TextTower, TextTokenizer]:
    config = TextTowerOptions(model=tiny_qwen3, pooling="last", prompts=PROMPTS, **options)
    torch.manual_seed(0)
    return TextTower(config).eval(), TextTokenizer(config)


def last_token_state(model, ids: list[int]) -> torch.Tensor:
    """The last hidden state of a text's last token, the text alone (no padding at all)."""
    return model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]


def perturb_adapters(module: torch.nn.Module) -> None:
    """LoRA's B starts at zero: give the adapters an effect to merge and to export."""
    torch.manual_seed(1)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)


@torch.no_grad()
def test_last_token_pooling_reads_each_texts_last_token_after_its_prompt(tiny_qwen3):
    model, tokenize = tower(tiny_qwen3)
    tokens = tokenize(TEXTS, "a")
    assert tokenize.tokenizer.padding_side == "left" and (tokens["attention_mask"][:, -1] == 1).all()
    pooled = model(tokens)
    for i, text in enumerate(TEXTS):  # each text alone, its prompt before it, unpadded
        ids = tokenize.tokenizer(PROMPTS["a"] + text)["input_ids"]
        assert torch.allclose(pooled[i], last_token_state(model.transformer, ids), atol=1e-5), text
    assert not torch.allclose(model(tokenize(TEXTS, "b")), pooled, atol=1e-3)  # side b's prompt differs
    mean, _ = tower(tiny_qwen3)  # the same weights, pooled by the mean of every token
    mean.pooling = "mean"
    assert not torch.allclose(mean(tokens), pooled, atol=1e-3)


@torch.no_grad()
def test_the_sentence_transformers_export_carries_the_pooling_the_prompts_and_the_merged_adapters(tiny_qwen3, tmp_path):
    from sentence_transformers import SentenceTransformer

    model, tokenize = tower(tiny_qwen3, lora=LORA)
    perturb_adapters(model)
    plain = merged(SiameseText(model))
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert any("lora" in name for name, _ in model.named_parameters())  # the towers themselves keep them
    save_sentence_transformer(plain.tower, tokenize, str(tmp_path / "st"))
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    for side, name in (("a", "query"), ("b", "document")):
        expected = F.normalize(model(tokenize(TEXTS, side)), dim=-1).numpy()
        assert st.encode(TEXTS, prompt_name=name) == pytest.approx(expected, abs=1e-5), side
    assert st.encode_query(TEXTS) == pytest.approx(st.encode(TEXTS, prompt_name="query"), abs=1e-6)
    config = json.loads((tmp_path / "st" / "1_Pooling" / "config.json").read_text())
    assert config["pooling_mode_lasttoken"] and not config["pooling_mode_mean_tokens"]


@torch.no_grad()
def test_lora_trains_only_the_adapters_and_exports_them_for_peft(tiny_qwen3, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    model, tokenize = tower(tiny_qwen3, lora=LORA)
    net = ContrastiveModel(SiameseText(model), InfoNCELoss(0.1), NTXentOptions())
    trainable = {name: p.numel() for name, p in net.named_parameters() if p.requires_grad}
    # per layer: q_proj 32 -> 32 and v_proj 32 -> 16 (one 16-wide key-value head), A: r x in, B: out x r
    assert set(trainable) == {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert sum(trainable.values()) == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    optim = OPTIMIZERS["adamw"]()
    grouped = [p for group in param_groups(net, optim, net.towers.lr_mults()) for p in group["params"]]
    assert sum(p.numel() for p in grouped) == sum(trainable.values())  # the optimizer holds the adapters alone
    perturb_adapters(model)
    state = trainable_state(net)  # a checkpoint: the adapters (the base model is the config's)
    assert set(state) == set(trainable)
    fresh, _ = tower(tiny_qwen3, lora=LORA)
    fresh_net = ContrastiveModel(SiameseText(fresh), InfoNCELoss(0.1), NTXentOptions())
    load_trainable_state(fresh_net, state)
    tokens = tokenize(TEXTS, "a")
    assert torch.allclose(fresh(tokens), model(tokens), atol=1e-6)
    with pytest.raises(RuntimeError, match="does not match the model"):
        load_trainable_state(fresh_net, {k: v for k, v in state.items() if "layers.1" not in k})

    exports = save_adapters(SiameseText(model), str(tmp_path))
    assert [e.path for e in exports] == ["adapter"] and exports[0].library == "peft"
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_qwen3), str(tmp_path / "adapter")).eval()
    hidden = peft_model(**tokens).last_hidden_state[:, -1]  # left padding: the last position is each text's last token
    assert torch.allclose(hidden, model(tokens), atol=1e-5)


def test_bad_lora_and_sharding_options_are_config_errors_before_ray(tiny_qwen3, monkeypatch):
    text = [f"text.tower.model={tiny_qwen3}", "text.tower.pooling=last"]
    with pytest.raises(ConfigError, match=r"text.tower.lora.target_modules: the model has no linear layer named "
                                          r"query; its linear layers are named down_proj, gate_proj, k_proj"):
        Config.load(CONFIGS / "text_tiny.yaml", [*text, "text.tower.lora={target_modules: [q_proj, query]}"])
    with pytest.raises(ConfigError, match="text.tower.lora: trains adapters on the tower: it does not go with freeze"):
        Config.load(CONFIGS / "text_tiny.yaml", [*text, "text.tower.lora={r: 4}", "text.tower.freeze=true"])
    with pytest.raises(ConfigError, match="image_text.text_tower.prompts: are the text task's"):
        Config.load(CONFIGS / "image_text_tiny.yaml", ["image_text.text_tower.prompts.b=x"])
    with pytest.raises(ConfigError, match=r"train.strategy=fsdp: the image task's encoder \(small_cnn\) is a CNN"):
        Config.load(None, ["train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="train.momentum keeps a whole momentum copy"):
        Config.load(CONFIGS / "text_tiny.yaml", [*text, "train.strategy=fsdp", "loss.queue_size=64",
                                                  "train.momentum=0.99"])
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"text.tower.lora: lora needs the peft package: pip install "
                                          r"'distributed_cl\[lora\]'"):
        Config.load(CONFIGS / "text_tiny.yaml", [*text, "text.tower.lora={r: 4}"])


QWEN_RUN = ["text.tower.pooling=last", f"text.tower.prompts={json.dumps(PROMPTS)}",
            "text.tower.lora={r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}",
            "train.grad_cache_chunk=6", "train.activation_checkpointing=true", "optim.lr=0.01"]
# An uninterrupted DDP run of QWEN_RUN (train.strategy=ddp) logs these losses at steps 4, 8, 12 and
# 16, the same on every run (measured with this test's command and train.strategy=ddp)
DDP_LOSSES = [3.4918771, 3.4699092, 3.4481453, 3.4850049]


def test_a_sharded_lora_run_of_a_decoder_embedder_resumes_from_its_shards_as_ddp_and_exports_it(
        tiny_qwen3, tmp_path, local_ray, capsys):
    """Qwen3 with last-token pooling, prompts and LoRA, sharded over 2 Ray Train workers with
    gradient caching and activation checkpointing (dropout on, in the adapters), a worker killed
    after the first checkpoint: it resumes from the checkpoint's shards, which hold the adapters
    alone, and logs the losses of an uninterrupted DDP run; every export embeds alike."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from test_own_data import a_worker_killed
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModel

    from distributed_cl.tasks import load_towers

    run = tmp_path / "runs" / "qwen"
    with a_worker_killed(run):
        summary, _ = run_train(capsys, tmp_path, "qwen", CONFIGS / "text_tiny.yaml", f"text.tower.model={tiny_qwen3}",
                               *QWEN_RUN, "train.strategy=fsdp", max_steps=16)
    assert 8 <= summary["metrics"]["start_step"] < 16  # resumed from the step-8 checkpoint
    assert logged(summary) == pytest.approx(DDP_LOSSES, rel=1e-5)
    checkpoint = max(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    saved = FileSystemReader(str(checkpoint / "shards")).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights), weights[:3]  # no base weight in the checkpoint
    towers = load_towers(run / "towers.pt")  # merged: a plain Qwen3, the prompts in its tokenizer
    with torch.no_grad():
        z = {side: F.normalize(towers.tower(towers.tokenize(TEXTS, side)), dim=-1).numpy() for side in "ab"}
    st = SentenceTransformer(str(run / "sentence_transformer"), device="cpu")
    assert st.encode(TEXTS, prompt_name="query") == pytest.approx(z["a"], abs=1e-5)
    assert st.encode(TEXTS, prompt_name="document") == pytest.approx(z["b"], abs=1e-5)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_qwen3), str(run / "adapter")).eval()
    with torch.no_grad():
        hidden = peft_model(**towers.tokenize(TEXTS, "a")).last_hidden_state[:, -1]
    assert F.normalize(hidden, dim=-1).numpy() == pytest.approx(z["a"], abs=1e-5)
    assert "library_name: peft" in (run / "adapter" / "README.md").read_text()


def test_the_caption_tower_takes_lora_too_and_its_towers_export_merged(tiny_bert, tmp_path):
    """image_text.text_tower.lora: the caption tower's adapters train (beside the image tower and the
    projections, which have no adapters); towers.pt holds the merged towers and a config without
    adapters, and loads to the same embeddings."""
    from distributed_cl.tasks import TASKS, load_towers

    config = Config.load(CONFIGS / "image_text_tiny.yaml", [f"image_text.text_tower.model={tiny_bert}",
                                                           "image_text.text_tower.lora={r: 4, alpha: 8}"])
    task = TASKS["image_text"](config)
    torch.manual_seed(0)
    towers = task.build_towers(config).eval()
    trainable = [n for n, p in towers.named_parameters() if p.requires_grad]
    text = [n for n in trainable if n.startswith("text_tower.")]
    assert text and all(".lora_A." in n or ".lora_B." in n for n in text)  # BERT's query and value: peft's default
    assert any(n.startswith("image_encoder.") for n in trainable)  # the rest trains as before
    perturb_adapters(towers)
    task.export(merged(towers), str(tmp_path))
    assert save_adapters(towers, str(tmp_path))[0].path == "adapter"
    loaded = load_towers(tmp_path / "towers.pt")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        tokens = task.tokenize(TEXTS)
        assert torch.allclose(loaded.embed_texts(tokens), towers.embed_texts(tokens), atol=1e-5)
