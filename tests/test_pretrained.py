"""Pretrained towers: torchvision encoders (weights from the torch hub cache), CLIPs from
transformers and open_clip with their own preprocessing, tokenizer and trained logit scale,
locked towers, the fine-tuning parameter groups, zero-shot classification, and the exports that
each library loads as it is; then fine-tuning runs of 2 Ray Train workers."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_cards import FIGURES, check_model_card, write_test_cards
from PIL import Image
from test_tasks import logged
from torch import nn

from distributed_cl.config import Config, ConfigError
from distributed_cl.data.table import Splits, Table
from distributed_cl.evaluate import zero_shot_top1
from distributed_cl.models import TorchvisionEncoder, load_encoder
from distributed_cl.models.image import cached_weights_file, torchvision_weights
from distributed_cl.optim import param_groups
from distributed_cl.tasks import TASKS, ContrastiveModel, load_towers
from distributed_cl.tasks.image_text import ImageTextTask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"
DIGITS = CONFIGS / "digits.yaml"


def pil_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def as_floats(images: list[Image.Image]) -> torch.Tensor:
    """What the towers take: float (n, 3, h, w) in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]).float() / 255


def hf_clip_config(tiny_clip: str, *overrides: str) -> Config:
    return Config.load(CONFIGS / "image_text_tiny.yaml",
                       ["image_text.towers=hf_clip", f"image_text.pretrained={tiny_clip}", *overrides])


def loss_and_feed(name: str) -> tuple:
    """The loss `loss.name: name` and its options, which feed it a batch's embeddings."""
    options = Config.load(overrides=[f"loss.name={name}"]).loss
    return options.build(), options


def perturb(module: nn.Module, seed: int = 7) -> None:
    """Move every weight, as training would: an export must carry these, not the pretrained ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


CAPTIONS = ["a red square", "a small blue dog", "green"]


# ----------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name,features", [("resnet18", 512), ("mobilenet_v3_small", 1024), ("convnext_tiny", 768),
                                           ("vit_b_16", 768)])
def test_any_torchvision_classifier_is_an_encoder_of_inputs_of_any_size_and_channels(name, features):
    for channels, size in ((3, 40), (1, 8)):  # vit_b_16 sees them resized to 224, the rest upsampled to 32
        encoder = TorchvisionEncoder(name, in_channels=channels).eval()
        assert encoder.out_dim == features
        with torch.no_grad():
            assert encoder(torch.rand(2, channels, size, size)).shape == (2, features)


def test_a_grayscale_stem_sums_the_rgb_filters_so_gray_images_embed_as_their_rgb_copies():
    torch.manual_seed(0)
    rgb = TorchvisionEncoder("resnet18", in_channels=3).eval()
    torch.manual_seed(0)
    gray = TorchvisionEncoder("resnet18", in_channels=1).eval()
    torch.testing.assert_close(gray.model.conv1.weight, rgb.model.conv1.weight.sum(1, keepdim=True))
    images = torch.rand(3, 1, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(gray(images), rgb(images.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)


def write_cached_weights(name: str, weights: str) -> dict:
    """A state dict of `name` (random, seeded) where torch.hub keeps `weights` (the suite's HOME)."""
    import torchvision

    torch.manual_seed(11)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    path = cached_weights_file(torchvision_weights(name, weights))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_torchvision_weights_load_from_the_hub_cache_and_never_silently_from_the_network(tmp_path):
    overrides = ["model.encoder=resnet18", "model.weights=IMAGENET1K_V1"]
    path = cached_weights_file(torchvision_weights("resnet18", "IMAGENET1K_V1"))
    path.unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"model.weights: resnet18's IMAGENET1K_V1 weights are not in the torch hub "
                                          rf"cache \({path}\); set model.download=true"):
        Config.load(DIGITS, overrides)
    state = write_cached_weights("resnet18", "IMAGENET1K_V1")
    config = Config.load(DIGITS, overrides)
    towers = TASKS["image"].build_towers(config)
    torch.testing.assert_close(towers.encoder.model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    torch.testing.assert_close(towers.encoder.model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))  # gray
    # normalised as the weights were trained (ImageNet's mean and std, averaged for one channel)
    assert towers.encoder.mean.flatten().tolist() == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    # the export holds the weights itself: it loads with the cache gone
    from distributed_cl.models import save_encoder

    save_encoder(towers.encoder, config.model, 1, tmp_path / "encoder.pt")
    path.unlink()
    loaded = load_encoder(tmp_path / "encoder.pt")
    images = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), towers.encoder.eval()(images))


@pytest.mark.parametrize("overrides,match", [
    (["model.encoder=resnet18", "model.weights=IMAGENET9K"], r"model.weights: resnet18 has no weights 'IMAGENET9K' "
                                                             r"\(known: IMAGENET1K_V1, DEFAULT\)"),
    (["model.weights=IMAGENET1K_V1"], "model.weights: small_cnn has no pretrained weights"),
    (["model.encoder=resnet_nine"], "model.encoder must be one of small_cnn, resnet18_small or a torchvision"),
    (["model.lr_mult=0"], "model.lr_mult: Input should be greater than 0"),
])
def test_image_model_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Config.load(DIGITS, overrides)


# ----------------------------------------------------------------------------- fine-tuning groups


def test_no_weight_decay_on_biases_norms_embeddings_and_scales_and_a_multiplier_per_tower():
    class Towers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.positional_embedding = nn.Parameter(torch.zeros(5, 4))
            self.patch_embedding = nn.Conv2d(3, 4, 2)  # a convolution, decayed like any
            self.body = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
            self.head = nn.Linear(4, 2)
            self.logit_scale = nn.Parameter(torch.tensor(2.0))
            self.frozen = nn.Linear(2, 2).requires_grad_(False)

    towers = Towers()
    config = Config.load(overrides=["optim.lr=0.1", "optim.weight_decay=0.05"]).optim
    groups = param_groups(towers, config, [([*towers.embed.parameters(), *towers.body.parameters(),
                                             towers.positional_embedding], 0.25)])
    by_param = {id(p): g for g in groups for p in g["params"]}
    expected = {"embed.weight": (0.025, 0.0), "positional_embedding": (0.025, 0.0), "body.0.weight": (0.025, 0.05),
                "body.0.bias": (0.025, 0.0), "body.1.weight": (0.025, 0.0), "body.1.bias": (0.025, 0.0),
                "head.weight": (0.1, 0.05), "head.bias": (0.1, 0.0), "logit_scale": (0.1, 0.0),
                "patch_embedding.weight": (0.1, 0.05), "patch_embedding.bias": (0.1, 0.0)}
    named = dict(towers.named_parameters())
    assert {n: (by_param[id(named[n])]["lr"], by_param[id(named[n])]["weight_decay"]) for n in expected} == expected
    assert sum(len(g["params"]) for g in groups) == len(expected)  # frozen weights stay out
    assert groups[0]["lr_mult"] == 1.0  # the console's lr is optim.lr's schedule


# ----------------------------------------------------------------------------- hf_clip


def test_hf_clip_towers_embed_as_clipmodel_with_its_processor_and_tokenizer(tiny_clip):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    config = hf_clip_config(tiny_clip)
    towers = TASKS["image_text"].build_towers(config).eval()
    reference = CLIPModel.from_pretrained(tiny_clip).eval()
    images = pil_images(3)
    pixels = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images, return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(tiny_clip)(CAPTIONS, padding=True, return_tensors="pt")
    task = ImageTextTask(config)
    with torch.no_grad():
        torch.testing.assert_close(towers.embed_images(as_floats(images)),
                                   reference.get_image_features(pixel_values=pixels).pooler_output, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(towers.embed_texts(task.tokenize(CAPTIONS)),
                                   reference.get_text_features(**tokens).pooler_output, atol=1e-5, rtol=1e-4)
        # the data's own size (the emoji's 16 here) is resized to the model's 32 first
        assert towers.embed_images(torch.rand(2, 3, 16, 16)).shape == (2, 16)


def test_the_clip_loss_starts_from_the_pretrained_logit_scale_and_trains_it(tiny_clip):
    config = hf_clip_config(tiny_clip, "loss.name=clip", "loss.temperature=0.5")
    towers = TASKS["image_text"].build_towers(config)
    net = ContrastiveModel(towers, config.loss.build(), config.loss)
    assert net.loss_fn.scale.item() == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's init, not 1 / 0.5
    task = ImageTextTask(config)
    batch = task.augment(task.collate(task.data.train.head(8)))
    net(batch)[0].backward()  # (loss, stats)
    assert towers.model.logit_scale.grad is not None and towers.model.logit_scale.grad != 0
    # a loss of fixed temperature leaves it alone (unused, it would stall DDP)
    towers = TASKS["image_text"].build_towers(hf_clip_config(tiny_clip, "loss.name=infonce"))
    ContrastiveModel(towers, *loss_and_feed("infonce"))
    assert not towers.model.logit_scale.requires_grad


def test_hf_siglip_towers_embed_as_siglipmodel_and_the_loss_trains_its_scale_and_bias(tiny_siglip):
    from transformers import AutoProcessor, SiglipModel

    config = hf_clip_config(tiny_siglip, "loss.name=siglip")
    towers = TASKS["image_text"].build_towers(config).eval()
    reference = SiglipModel.from_pretrained(tiny_siglip).eval()
    processor = AutoProcessor.from_pretrained(tiny_siglip)
    images = pil_images(3)
    # as SigLIP was trained: texts padded to the context length, no attention mask
    inputs = processor(images=images, text=CAPTIONS, padding="max_length", max_length=48, return_tensors="pt")
    task = ImageTextTask(config)
    with torch.no_grad():
        torch.testing.assert_close(towers.embed_images(as_floats(images)),
                                   reference.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(towers.embed_texts(task.tokenize(CAPTIONS)),
                                   reference.get_text_features(input_ids=inputs["input_ids"]).pooler_output,
                                   atol=1e-5, rtol=1e-4)
    net = ContrastiveModel(towers.train(), config.loss.build(), config.loss)
    assert net.loss_fn.scale.item() == pytest.approx(10.0) and net.loss_fn.logit_bias.item() == -10.0
    assert net.loss_fn.logit_bias is towers.model.logit_bias
    net(task.augment(task.collate(task.data.train.head(8))))[0].backward()
    assert towers.model.logit_scale.grad.abs().item() > 0 and towers.model.logit_bias.grad.abs().item() > 0


@pytest.mark.parametrize("locked", ["image", "text"])
def test_a_locked_tower_keeps_its_weights_while_the_other_trains(tiny_clip, locked):
    config = hf_clip_config(tiny_clip, f"image_text.lock_{locked}=true", "loss.name=clip")
    towers = TASKS["image_text"].build_towers(config)
    net = ContrastiveModel(towers, config.loss.build(), config.loss).train()
    groups = param_groups(net, config.optim, towers.lr_mults())
    optimizer = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in towers.named_parameters()}
    task = ImageTextTask(config)
    batch = task.augment(task.collate(task.data.train.head(8)))
    net(batch)[0].backward()
    optimizer.step()
    tower_params = towers.tower_parameters()
    ids = {tower: {id(p) for p in params} for tower, params in tower_params.items()}
    other = "text" if locked == "image" else "image"
    for name, p in towers.named_parameters():
        if id(p) in ids[locked]:
            assert torch.equal(p, before[name]) and p.grad is None, name
    assert all(not torch.equal(p, before[n]) for n, p in towers.named_parameters() if id(p) in ids[other])
    locked_modules = towers.image_modules() if locked == "image" else towers.text_modules()
    assert all(not m.training for m in locked_modules)  # evaluated as it is: no dropout


def test_a_siglip_with_a_softmax_loss_and_other_checkpoints_are_refused_before_ray_starts(tmp_path, tiny_bert):
    from transformers import SiglipConfig

    SiglipConfig().save_pretrained(tmp_path / "siglip")
    with pytest.raises(ConfigError, match=r"image_text.pretrained: .*siglip is a SigLIP checkpoint \(sigmoid loss, "
                                          r"with a logit bias\): train it with loss.name: siglip"):
        hf_clip_config(str(tmp_path / "siglip"), "loss.name=clip")
    hf_clip_config(str(tmp_path / "siglip"), "loss.name=siglip")  # accepted
    with pytest.raises(ConfigError, match=r"is a 'bert' model; towers: hf_clip loads model_type 'clip' or 'siglip'"):
        hf_clip_config(tiny_bert)
    with pytest.raises(ConfigError, match=r"'openai/clip-vit-base-patch32' is not a local directory and "
                                          r"image_text.download is false"):
        hf_clip_config("openai/clip-vit-base-patch32")
    with pytest.raises(ConfigError, match=r"image_text.towers: hf_clip needs image_text.pretrained"):
        Config.load(CONFIGS / "image_text_tiny.yaml", ["image_text.towers=hf_clip"])
    with pytest.raises(ConfigError, match=r"lock_image and image_text.lock_text are both true"):
        hf_clip_config(str(tmp_path), "image_text.lock_image=true", "image_text.lock_text=true")
    with pytest.raises(ConfigError, match=r"image_text.lock_image / lock_text lock pretrained towers"):
        Config.load(CONFIGS / "image_text_tiny.yaml", ["image_text.lock_text=true"])


# ----------------------------------------------------------------------------- open_clip


def open_clip_config(tiny_open_clip: dict, *overrides: str) -> Config:
    return Config.load(CONFIGS / "image_text_tiny.yaml", [*tiny_open_clip["overrides"], *overrides])


def test_open_clip_towers_embed_as_open_clip_with_its_transforms_and_tokenizer(tiny_open_clip):
    import open_clip

    config = open_clip_config(tiny_open_clip)
    towers = TASKS["image_text"].build_towers(config).eval()
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_open_clip["name"],
                                                                 pretrained=tiny_open_clip["checkpoint"])
    images = pil_images(3)
    task = ImageTextTask(config)
    with torch.no_grad():
        torch.testing.assert_close(towers.embed_images(as_floats(images)),
                                   model.eval().encode_image(torch.stack([preprocess(im) for im in images])),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(towers.embed_texts(task.tokenize(CAPTIONS)),
                                   model.encode_text(open_clip.get_tokenizer(tiny_open_clip["name"])(CAPTIONS)),
                                   atol=1e-5, rtol=1e-4)
    assert towers.logit_scale is towers.model.logit_scale


def test_an_open_clip_siglip_trains_with_the_sigmoid_loss_only(tmp_path, tiny_open_clip):
    import json

    config = json.loads(Path(tiny_open_clip["config"]).read_text()) | {"init_logit_bias": -10}
    (tmp_path / "tiny-siglip.json").write_text(json.dumps(config))
    overrides = ["image_text.towers=open_clip", "image_text.pretrained=tiny-siglip",
                 f"image_text.open_clip_config={tmp_path}/tiny-siglip.json"]
    with pytest.raises(ConfigError, match="tiny-siglip is a SigLIP checkpoint"):
        Config.load(CONFIGS / "image_text_tiny.yaml", [*overrides, "loss.name=clip"])
    siglip = Config.load(CONFIGS / "image_text_tiny.yaml", [*overrides, "loss.name=siglip"])
    towers = TASKS["image_text"].build_towers(siglip)
    net = ContrastiveModel(towers, siglip.loss.build(), siglip.loss)
    assert net.loss_fn.logit_bias is towers.model.logit_bias and net.loss_fn.logit_scale is towers.model.logit_scale
    with pytest.raises(ValueError, match="the pretrained towers are a SigLIP"):  # (hf-hub: ones meet this in the worker)
        ContrastiveModel(towers, *loss_and_feed("clip"))
    with pytest.raises(ConfigError, match="names weights on the Hugging Face Hub, and image_text.download is false"):
        Config.load(CONFIGS / "image_text_tiny.yaml", ["image_text.towers=open_clip",
                                                       "image_text.pretrained=ViT-B-32:laion2b_s34b_b79k"])


# ----------------------------------------------------------------------------- exports


def export_moved(task, towers, tmp_path) -> Path:
    directory = tmp_path / "export"
    directory.mkdir()
    task.export(towers, str(directory))
    write_test_cards(task, towers, directory)
    return directory


def test_the_text_export_is_a_sentence_transformer_and_towers_pt_stands_alone(tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    model_dir = shutil.copytree(tiny_bert, tmp_path / "bert")
    config = Config.load(CONFIGS / "text_tiny.yaml", [f"text.tower.model={model_dir}"])
    task = TASKS["text"](config)
    towers = task.build_towers(config).eval()
    perturb(towers)
    directory = export_moved(task, towers, tmp_path)
    texts = [row for row in task.data.test.a[:20]]
    with torch.no_grad():
        ours = towers.tower(task.tokenize(texts))
    encoded = SentenceTransformer(str(directory / "sentence_transformer"), device="cpu").encode(texts, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(encoded, ours, dim=1)
    assert cosine.min().item() >= 0.9999
    torch.testing.assert_close(encoded.norm(dim=1), torch.ones(len(texts)))  # normalised, as the loss sees them
    shutil.rmtree(model_dir)  # the training machine's files are gone: towers.pt holds all it needs
    loaded = load_towers(str(directory / "towers.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.tower(loaded.tokenize(texts)), ours)
    # the model cards' snippets load these exports, as written
    made = check_model_card(directory / "sentence_transformer", "sentence-transformers", str(model_dir), FIGURES)
    assert made["embeddings"].shape == (2, towers.tower.out_dim)
    made = check_model_card(directory, "pytorch", str(model_dir), FIGURES)
    with torch.no_grad():
        torch.testing.assert_close(made["towers"].tower(loaded.tokenize(texts)), ours)


def test_the_hf_clip_export_loads_in_transformers_as_the_trained_towers(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    model_dir = shutil.copytree(tiny_clip, tmp_path / "clip")
    config = hf_clip_config(str(model_dir))
    task = ImageTextTask(config)
    towers = task.build_towers(config).eval()
    perturb(towers)
    directory = export_moved(task, towers, tmp_path)
    shutil.rmtree(model_dir)
    model = CLIPModel.from_pretrained(directory / "hf_clip").eval()
    processor = CLIPProcessor.from_pretrained(directory / "hf_clip")
    loaded = load_towers(str(directory / "towers.pt"))
    images = pil_images(4, seed=1)
    inputs = processor(images=images, text=CAPTIONS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours_images, ours_texts = loaded.embed_images(as_floats(images)), loaded.embed_texts(loaded.tokenize(CAPTIONS))
        torch.testing.assert_close(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
                                   ours_images, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.get_text_features(input_ids=inputs["input_ids"],
                                                           attention_mask=inputs["attention_mask"]).pooler_output,
                                   ours_texts, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours_images, towers.embed_images(as_floats(images)))
    assert model.logit_scale.item() == pytest.approx(towers.logit_scale.item())  # the trained scale went along
    made = check_model_card(directory / "hf_clip", "transformers", str(model_dir), FIGURES)
    assert made["probs"].shape == (1, 2) and type(made["model"]).__name__ == "CLIPModel"


def test_the_hf_siglip_export_loads_in_transformers_as_the_trained_towers(tiny_siglip, tmp_path):
    from transformers import AutoModel, AutoProcessor

    model_dir = shutil.copytree(tiny_siglip, tmp_path / "siglip")
    config = hf_clip_config(str(model_dir), "loss.name=siglip")
    task = ImageTextTask(config)
    towers = task.build_towers(config).eval()
    perturb(towers)
    directory = export_moved(task, towers, tmp_path)
    shutil.rmtree(model_dir)
    model = AutoModel.from_pretrained(directory / "hf_clip").eval()
    assert type(model).__name__ == "SiglipModel"
    processor = AutoProcessor.from_pretrained(directory / "hf_clip")
    loaded = load_towers(str(directory / "towers.pt"))
    images = pil_images(4, seed=1)
    inputs = processor(images=images, text=CAPTIONS, padding="max_length", max_length=48, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
                                   loaded.embed_images(as_floats(images)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.get_text_features(input_ids=inputs["input_ids"]).pooler_output,
                                   loaded.embed_texts(loaded.tokenize(CAPTIONS)), atol=1e-5, rtol=1e-4)
    assert model.logit_bias.item() == pytest.approx(towers.logit_bias.item())  # the trained bias went along
    assert model.logit_bias.item() != -10.0
    made = check_model_card(directory / "hf_clip", "transformers", str(model_dir), FIGURES)
    assert made["probs"].shape == (1, 2) and type(made["model"]).__name__ == "SiglipModel"


def test_the_open_clip_export_loads_in_open_clip_as_the_trained_towers(tiny_open_clip, tmp_path):
    import open_clip

    config = open_clip_config(tiny_open_clip)
    task = ImageTextTask(config)
    towers = task.build_towers(config).eval()
    perturb(towers)
    directory = export_moved(task, towers, tmp_path)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_open_clip["name"],
                                                                 pretrained=str(directory / "open_clip.pt"))
    loaded = load_towers(str(directory / "towers.pt"))
    images = pil_images(4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(torch.stack([preprocess(im) for im in images])),
                                   loaded.embed_images(as_floats(images)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(open_clip.get_tokenizer(tiny_open_clip["name"])(CAPTIONS)),
                                   loaded.embed_texts(loaded.tokenize(CAPTIONS)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loaded.embed_images(as_floats(images)), towers.embed_images(as_floats(images)))
    made = check_model_card(directory, "open_clip", config.image_text.pretrained, FIGURES)
    with torch.no_grad():
        torch.testing.assert_close(made["model"].eval().encode_text(made["tokenizer"](CAPTIONS)),
                                   loaded.embed_texts(loaded.tokenize(CAPTIONS)), atol=1e-5, rtol=1e-4)


CLIP_LORA = {  # per library: each tower's lora block (ranks of their own; the text's layers named, the image's default)
    "hf_clip": ["image_text.image_tower.lora={r: 4, alpha: 8, dropout: 0.0}",
                "image_text.text_tower.lora={r: 2, alpha: 8, dropout: 0.0, target_modules: [q_proj, fc1]}"],
    # open_clip's blocks: a torch MultiheadAttention (no linear layer an adapter could run in) and an MLP
    "open_clip": ["image_text.image_tower.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [c_fc]}",
                  "image_text.text_tower.lora={r: 2, alpha: 8, dropout: 0.0, target_modules: [c_fc, c_proj]}"],
}


@pytest.mark.parametrize("library", CLIP_LORA)
def test_lora_on_a_clip_trains_each_towers_adapters_and_the_scale_and_exports_them_merged_and_alone(
        library, tiny_clip, tiny_open_clip, tmp_path):
    """Adapters on both towers, each tower its own rank; the towers' weights frozen, the logit
    scale trained; the optimizer and the checkpoint hold those alone. The library's export holds
    the merged weights, and adapter/ loads onto the base model with peft (its card's snippet, as
    written), both embedding as the trained towers."""
    from peft import PeftModel

    from distributed_cl.models.lora import merged, save_adapters
    from distributed_cl.train_loop import trainable_state

    config = (hf_clip_config(tiny_clip, *CLIP_LORA[library]) if library == "hf_clip"
              else open_clip_config(tiny_open_clip, *CLIP_LORA[library]))
    task = ImageTextTask(config)
    towers = task.build_towers(config).eval()
    net = ContrastiveModel(towers, config.loss.build(), config.loss)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_A." in n or ".lora_B." in n} | {"towers.logit_scale"}
    image = {id(p) for p in towers.tower_parameters()["image"]}
    ranks = {("image" if id(p) in image else "text", p.shape[0]) for n, p in towers.named_parameters() if ".lora_A." in n}
    assert ranks == {("image", 4), ("text", 2)}
    if library == "open_clip":  # the text tower's c_fc, not also the image tower's visual.transformer.*.c_fc
        assert sum(".lora_A." in n for n in trainable) == 2 + 2 * 2
    grouped = {id(p) for group in param_groups(net, config.optim, towers.lr_mults()) for p in group["params"]}
    assert grouped == {id(p) for p in net.parameters() if p.requires_grad}
    state = trainable_state(net)  # a checkpoint: the adapters and the scale (under each of its names)
    assert {k for k in state if not k.endswith("logit_scale")} == trainable - {"towers.logit_scale"}
    assert "towers.logit_scale" in state

    torch.manual_seed(1)  # a trained state: B moved off zero, the scale off its start
    with torch.no_grad():
        for p in towers.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    directory = tmp_path / "export"
    directory.mkdir()
    task.export(merged(towers), str(directory))
    (adapter,) = save_adapters(towers, str(directory), task.adapter_base)
    write_test_cards(task, merged(towers), directory, [adapter])
    base = task.build_towers(config.model_copy(update={"image_text": config.image_text.model_copy(
        update={"image_tower": config.image_text.image_tower.model_copy(update={"lora": None}),
                "text_tower": config.image_text.text_tower.model_copy(update={"lora": None})})}))
    images, tokens = as_floats(pil_images(4, seed=3)), task.tokenize(CAPTIONS)
    with torch.no_grad():
        want = towers.embed_images(images), towers.embed_texts(tokens)
        assert not torch.allclose(base.embed_images(images), want[0], atol=1e-3)  # the adapters changed them
        made = check_model_card(directory / "adapter", "peft", task.base_model, FIGURES)  # as the card says
        peft_model = made["model"].eval()
        assert isinstance(peft_model, PeftModel)
        base.model = peft_model  # the adapter on the library's base model, in the towers' preprocessing and calls
        torch.testing.assert_close((base.embed_images(images), base.embed_texts(tokens)), want, atol=1e-5, rtol=1e-4)
        loaded = load_towers(str(directory / "towers.pt"))  # merged: no adapters, the same embeddings
        assert not any("lora" in n for n, _ in loaded.named_parameters())
        torch.testing.assert_close((loaded.embed_images(images), loaded.embed_texts(tokens)), want, atol=1e-5, rtol=1e-4)
        assert loaded.logit_scale.item() == pytest.approx(towers.logit_scale.item())
    if library == "hf_clip":
        from transformers import CLIPModel

        exported = CLIPModel.from_pretrained(directory / "hf_clip").eval()
        pixels = towers.preprocess(images)
        torch.testing.assert_close(exported.get_image_features(pixel_values=pixels).pooler_output, want[0],
                                   atol=1e-5, rtol=1e-4)
    else:
        import open_clip

        exported = open_clip.create_model(tiny_open_clip["name"], pretrained=str(directory / "open_clip.pt")).eval()
        torch.testing.assert_close(exported.encode_text(tokens["input_ids"]), want[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides,error,match", [
    (["image_text.text_tower.lora={target_modules: [q_proj, query]}"], ConfigError,
     r"image_text.text_tower.lora.target_modules: the model has no linear layer named query; its linear layers are "
     r"named .*fc1, fc2, k_proj, out_proj, q_proj, v_proj"),
    (["image_text.image_tower.lora={r: 4}", "image_text.lock_image=true"], ConfigError,
     "image_text.image_tower.lora: trains adapters on the tower that image_text.lock_image keeps fixed"),
    (["image_text.image_tower.lora={dropout: 0.1}", "image_text.text_tower.lora={dropout: 0.0}"], ConfigError,
     "image_tower.lora.dropout and text_tower.lora.dropout differ: one adapter takes one dropout"),
    (["image_text.towers=scratch", "image_text.pretrained=null", "image_text.image_tower.lora={r: 4}"], ConfigError,
     "image_text.image_tower.lora: adapts a pretrained CLIP's image tower"),
    (["image_text.image_tower.lora={r: 4}", "peft missing"], ConfigError,
     r"image_text.image_tower.lora: lora needs the peft package: pip install 'distributed_cl\[lora\]'"),
])
def test_bad_lora_blocks_on_clip_towers_are_config_errors_before_ray(tiny_clip, monkeypatch, overrides, error, match):
    if "peft missing" in overrides:
        monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(error, match=match):
        hf_clip_config(tiny_clip, *[o for o in overrides if o != "peft missing"])


def test_open_clip_towers_name_their_lora_layers(tiny_open_clip):
    with pytest.raises(ConfigError, match=r"image_text.image_tower.lora.target_modules: name the linear layers to "
                                          r"adapt \(peft has no default for this model\), e.g. \['c_fc', 'c_proj'\]"):
        open_clip_config(tiny_open_clip, "image_text.image_tower.lora={r: 4}")


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_top1_takes_the_nearest_prompt():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.1], [-1.0, 0.1]])
    prompts = torch.tensor([[0.0, 1.0], [3.0, 0.0]])  # class 7, class 2
    classes, labels = torch.tensor([7, 2]), torch.tensor([2, 7, 2, 7])
    # nearest prompts: 2, 7, 7 (cos 0.74 > 0.67), 7 (cos 0.10 > -0.99): all but the third right
    assert zero_shot_top1(images, prompts, classes, labels) == 0.75


def test_class_prompts_come_from_the_label_names_with_the_template(tiny_clip):
    config = hf_clip_config(tiny_clip, "image_text.zeroshot_template=an emoji of {}")
    test = Table(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), ["a", "b", "c", "d"], torch.tensor([5, 1, 5, 9]),
                 label_names={1: "cat", 5: "red car", 9: "dog"})
    task = ImageTextTask(config, data=Splits(train=test, test=test, bank=test))
    prompts, classes = task.class_prompts()
    assert prompts == ["an emoji of cat", "an emoji of red car", "an emoji of dog"] and classes.tolist() == [1, 5, 9]
    with pytest.raises(ConfigError, match=r"image_text.zeroshot_template must hold \{\}"):
        hf_clip_config(tiny_clip, "image_text.zeroshot_template=a photo")


# ----------------------------------------------------------------------------- fine-tuning runs
# trainer.run as train.py calls it, 2 workers, on the session's local Ray. (hf_clip's run is
# test_own_data.py's, on labelled csv rows; open_clip's LiT run is test_tasks.py's, on the emoji.)


def train(tmp_path, name, config_file, overrides, capsys, max_steps=16) -> dict:
    from distributed_cl import trainer

    config = Config.load(config_file, [*overrides, f"train.max_steps={max_steps}", "train.epochs=null",
                                       f"train.name={name}", f"train.storage_path={tmp_path}/runs"])
    summary = trainer.run(config)
    capsys.readouterr()
    return summary


def test_a_torchvision_resnet_from_cached_weights_fine_tunes_with_simclr(tmp_path, local_ray, capsys):
    """Digits are 8x8 and gray: upsampled to 32 and through a summed stem."""
    state = write_cached_weights("resnet18", "IMAGENET1K_V1")
    summary = train(tmp_path, "resnet", DIGITS, ["model.encoder=resnet18", "model.weights=IMAGENET1K_V1",
                                                 "model.lr_mult=0.1", "optim.lr=0.001", "data.eval_bank_size=300",
                                                 "data.eval_test_size=100", "train.log_every=5",
                                                 "train.global_batch_size=32"], capsys, max_steps=10)
    losses = logged(summary)
    assert losses[-1] < losses[0], losses
    m = summary["metrics"]
    assert m["knn_top1_untrained"] != m["knn_top1_trained"]  # "untrained": the pretrained start
    os.remove(cached_weights_file(torchvision_weights("resnet18", "IMAGENET1K_V1")))
    encoder = load_encoder(summary["encoder"])  # no weights file needed
    assert not torch.equal(encoder.model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])  # fine-tuned


def test_relative_pretrained_paths_are_made_absolute_for_the_workers(tiny_clip, tiny_open_clip, tmp_path, monkeypatch):

    shutil.copytree(tiny_clip, tmp_path / "clip")
    shutil.copy(tiny_open_clip["checkpoint"], tmp_path / "oc.pt")
    shutil.copy(tiny_open_clip["config"], tmp_path / "tiny-test-clip.json")
    monkeypatch.chdir(tmp_path)  # workers may run elsewhere: they must not depend on the driver's directory
    hf = hf_clip_config("clip").resolve_paths().image_text
    assert hf.pretrained == str(tmp_path / "clip")
    oc = Config.load(CONFIGS / "image_text_tiny.yaml", [
        "image_text.towers=open_clip", "image_text.open_clip_config=tiny-test-clip.json",
        "image_text.pretrained=tiny-test-clip:oc.pt"]).resolve_paths().image_text
    assert (oc.pretrained, oc.open_clip_config) == (f"tiny-test-clip:{tmp_path}/oc.pt", str(tmp_path / "tiny-test-clip.json"))


def test_an_open_clip_local_dir_loads_its_config_and_weights_together(tiny_open_clip, tmp_path):
    """open_clip's `local-dir:` schema (what `hf-hub:` downloads into): open_clip_config.json and
    the weights in one directory; the same towers as NAME:/path/to/checkpoint.pt."""
    import json

    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(
        Path(tiny_open_clip["config"]).read_text())}))
    shutil.copy(tiny_open_clip["checkpoint"], directory / "open_clip_pytorch_model.bin")
    local = TASKS["image_text"].build_towers(Config.load(CONFIGS / "image_text_tiny.yaml", [
        "image_text.towers=open_clip", f"image_text.pretrained=local-dir:{directory}"])).eval()
    named = TASKS["image_text"].build_towers(open_clip_config(tiny_open_clip)).eval()
    images = as_floats(pil_images(2, seed=3))
    with torch.no_grad():
        torch.testing.assert_close(local.embed_images(images), named.embed_images(images))
    with pytest.raises(ConfigError, match="local-dir:/no/such: no such directory"):
        Config.load(CONFIGS / "image_text_tiny.yaml", ["image_text.towers=open_clip", "image_text.pretrained=local-dir:/no/such"])
