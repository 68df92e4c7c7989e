"""Pretrained CLIP towers for the image-text task: a Hugging Face `CLIPModel` or `SiglipModel`, or
an open_clip model, each behind the dual-encoder calling convention (`embed_images`, `embed_texts`,
`towers(images, tokens)`), with the model's own preprocessing and tokenizer, and its trained
`logit_scale` (and a SigLIP's `logit_bias`), which the loss starts from and goes on learning.
Images arrive as float (n, 3, h, w) in [0, 1] at the data's size; the towers resize them to the
model's size and normalise them with its mean and std.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distributed_cl.models.lora import LoraOptions, has_lora, peft_installed, with_tower_lora
from distributed_cl.models.text import TextTokenizer
from distributed_cl.options import absolute


class TowerOptions(Protocol):
    lr_mult: float
    lora: LoraOptions | None


class ClipSource(Protocol):
    """What the pretrained towers read of the image_text section."""

    pretrained: str | None
    download: bool
    open_clip_config: str | None
    lock_image: bool
    lock_text: bool
    image_tower: TowerOptions
    text_tower: TowerOptions

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class SigLipCheckpoint(ValueError):
    """A sigmoid-loss checkpoint (SigLIP: a logit bias beside the scale) with a softmax loss."""


def _siglip_error(what: str) -> SigLipCheckpoint:
    return SigLipCheckpoint(
        f"image_text.pretrained: {what} is a SigLIP checkpoint (sigmoid loss, with a logit bias): train it with "
        "loss.name: siglip, which starts from its scale and bias; a softmax loss would discard the bias and "
        "retrain the scale")


# The transformers dual encoders `towers: hf_clip` loads, by config model_type: (config class, model
# class, the modules of the image tower, whether the text tower reads an attention mask).
HF_DUAL_ENCODERS = {
    "clip": ("CLIPConfig", "CLIPModel", ("vision_model", "visual_projection"), True),
    # SigLIP was trained on texts padded to its context length and pools the last position, unmasked
    "siglip": ("SiglipConfig", "SiglipModel", ("vision_model",), False),
}


def _hf_classes(model_type: str):
    import transformers

    config_class, model_class, _, _ = HF_DUAL_ENCODERS[model_type]
    return getattr(transformers, config_class), getattr(transformers, model_class)


class PretrainedClip(nn.Module):
    """What both libraries' towers share: preprocessing, locking, LoRA, and the dual-encoder
    calls. Subclasses set `self.model` and `self.logit_scale`, name the image tower's modules (the
    text tower is the rest of the model), then call `_adapt_and_lock`.

    With a `lora` block on either tower, `self.model` is one peft model over the whole CLIP: the
    towers' weights frozen, adapters on the named layers of each tower that has a block, and the
    logit scale (and bias) trained as before."""

    lora_targets: list[str] | None = None  # the layers adapted where a lora block names none

    def __init__(self, image_size: int, mean, std, config: ClipSource) -> None:
        super().__init__()
        self.image_size, self.lock_image, self.lock_text = image_size, config.lock_image, config.lock_text
        self.lr_mult = {"image": config.image_tower.lr_mult, "text": config.text_tower.lr_mult}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def base(self) -> nn.Module:
        """The library's own model (under LoRA, the one peft wraps, with its adapters in place)."""
        return self.model.get_base_model() if has_lora(self.model) else self.model

    def image_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def text_modules(self) -> list[nn.Module]:
        image = {id(m) for m in self.image_modules()}
        return [m for m in self.base.children() if id(m) not in image]

    def tower_parameters(self) -> dict[str, list[nn.Parameter]]:
        """{"image": ..., "text": ...}: every parameter of the model but the logit scale (and bias)."""
        image = {id(p) for m in self.image_modules() for p in m.parameters()}
        shared = {id(self.logit_scale), id(getattr(self.base, "logit_bias", None))}
        params = [p for p in self.model.parameters() if id(p) not in shared]
        return {"image": [p for p in params if id(p) in image], "text": [p for p in params if id(p) not in image]}

    def _adapt_and_lock(self, config: ClipSource) -> None:
        if config.image_tower.lora is not None or config.text_tower.lora is not None:
            towers = {"image_tower": (self.image_modules(), config.image_tower.lora),
                      "text_tower": (self.text_modules(), config.text_tower.lora)}
            self.model = with_tower_lora(self.model, towers, self.lora_targets)
            for p in (self.logit_scale, getattr(self, "logit_bias", None)):
                if p is not None:
                    p.requires_grad_(True)  # peft froze everything but its adapters: the loss trains these
        for tower, params in self.tower_parameters().items():
            if getattr(self, f"lock_{tower}"):
                for p in params:
                    p.requires_grad_(False)

    def lr_mults(self) -> list[tuple[list[nn.Parameter], float]]:
        return [(params, self.lr_mult[tower]) for tower, params in self.tower_parameters().items()]

    def preprocess(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                                   align_corners=False).clamp_(0, 1)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def embed_images(self, images: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_image):
            return self._image_features(self.preprocess(images))

    def embed_texts(self, tokens: dict) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_text):
            return self._text_features(tokens)

    def forward(self, images: Tensor, tokens: dict) -> tuple[Tensor, Tensor]:
        return self.embed_images(images), self.embed_texts(tokens)

    def embed_b(self, tokens: dict) -> Tensor:
        """Captions (the rows' hard negatives)."""
        return self.embed_texts(tokens)

    def train(self, mode: bool = True) -> PretrainedClip:
        super().train(mode)
        for modules, locked in ((self.image_modules(), self.lock_image), (self.text_modules(), self.lock_text)):
            for module in modules:
                module.train(mode and not locked)  # a locked tower runs as evaluated: no dropout
        return self


def _features(out) -> Tensor:
    """transformers 5 returns the projected features as `pooler_output`; earlier versions, a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


class HFClipTowers(PretrainedClip):
    """A transformers `CLIPModel` or `SiglipModel`: from `image_text.pretrained` (a directory saved
    by `save_pretrained`, or a Hub name with image_text.download), or, with `architecture`, its
    config alone (weights loaded afterwards, as `load_towers` does)."""

    lora_targets = ["q_proj", "v_proj"]  # the attention's query and value, peft's usual choice

    def __init__(self, config: ClipSource, architecture: dict | None = None) -> None:
        from distributed_cl.models.text import _quiet_progress_bars

        _quiet_progress_bars()
        if architecture is None:
            source = resolve_hf_clip(config)
            self.model_type = hf_model_type(source, config.download)
            model = _hf_classes(self.model_type)[1].from_pretrained(source, local_files_only=not config.download)
            processor = _image_processor(source, config.download)
            mean, std = processor.get("image_mean", OPENAI_MEAN), processor.get("image_std", OPENAI_STD)
        else:
            self.model_type = architecture.get("model_type", "clip")
            config_class, model_class = _hf_classes(self.model_type)
            model = model_class(config_class.from_dict(architecture["clip"]))
            mean, std = architecture["mean"], architecture["std"]
        super().__init__(model.config.vision_config.image_size, mean, std, config)
        self.model = model
        self.logit_scale = model.logit_scale  # the same parameter: the loss trains it, the export carries it
        if self.model_type == "siglip":
            self.logit_bias = model.logit_bias
        self._adapt_and_lock(config)

    def image_modules(self) -> list[nn.Module]:
        return [getattr(self.base, name) for name in HF_DUAL_ENCODERS[self.model_type][2]]

    def _image_features(self, pixels: Tensor) -> Tensor:
        return _features(self.base.get_image_features(pixel_values=pixels))

    def _text_features(self, tokens: dict) -> Tensor:
        mask = tokens["attention_mask"] if HF_DUAL_ENCODERS[self.model_type][3] else None
        return _features(self.base.get_text_features(input_ids=tokens["input_ids"], attention_mask=mask))

    def architecture(self) -> dict:
        return {"model_type": self.model_type, "clip": self.base.config.to_dict(),
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def export(self, directory: str, tokenizer) -> str:
        """hf_clip/: `CLIPModel` / `SiglipModel.from_pretrained(path)` (or AutoModel), and the
        processor (`AutoProcessor.from_pretrained(path)`)."""
        import transformers

        path = os.path.join(directory, "hf_clip")
        self.base.save_pretrained(path)  # (merged towers: no adapters)
        size, mean, std = self.image_size, self.mean.flatten().tolist(), self.std.flatten().tolist()
        if self.model_type == "siglip":
            images = transformers.SiglipImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
            processor = transformers.SiglipProcessor(image_processor=images, tokenizer=tokenizer)
        else:
            images = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                     image_mean=mean, image_std=std)
            processor = transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer)
        processor.save_pretrained(path)
        return path


def resolve_hf_clip(config: ClipSource) -> str:
    """A local CLIP directory as an absolute path, or a Hub name (fetched only with image_text.download)."""
    path = os.path.expanduser(config.pretrained or "")
    if os.path.isdir(path):
        return os.path.abspath(path)
    if config.download:
        return config.pretrained
    raise FileNotFoundError(
        f"image_text.pretrained: {config.pretrained!r} is not a local directory and image_text.download is false: "
        "point it at a directory saved by CLIPModel.save_pretrained, or set image_text.download=true to fetch "
        "it from the Hugging Face Hub")


def _image_processor(source: str, download: bool) -> dict:
    """The checkpoint's image preprocessing (mean, std), where it ships one."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        return ImageProcessingMixin.get_image_processor_dict(source, local_files_only=not download)[0]
    except OSError:
        return {}


def hf_model_type(source: str, download: bool) -> str:
    """The checkpoint's config model_type (reads its config only)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, local_files_only=not download).model_type


def check_hf_clip(config: ClipSource, loss_name: str) -> None:
    """Before Ray starts: the checkpoint is there, is a dual encoder transformers has, a SigLIP one
    trains with the sigmoid loss, and LoRA's target layers are in its towers."""
    from transformers import AutoConfig

    source = resolve_hf_clip(config)
    kind = hf_model_type(source, config.download)
    if kind not in HF_DUAL_ENCODERS:
        raise ValueError(f"image_text.pretrained: {config.pretrained} is a {kind!r} model; towers: hf_clip loads "
                         f"model_type {' or '.join(map(repr, HF_DUAL_ENCODERS))}")
    if kind == "siglip" and loss_name != "siglip":
        raise _siglip_error(config.pretrained)
    model_config = AutoConfig.from_pretrained(source, local_files_only=not config.download).to_dict()
    check_clip_lora(config, lambda: HFClipTowers(config, {"model_type": kind, "clip": model_config,
                                                          "mean": OPENAI_MEAN, "std": OPENAI_STD}))


def check_clip_lora(config: ClipSource, skeleton: Callable[[], PretrainedClip]) -> None:
    """Where a tower has a lora block: peft is installed, and the towers built on the meta device
    (no weights, no memory) take the adapters."""
    if config.image_tower.lora is None and config.text_tower.lora is None:
        return
    if why := peft_installed():
        tower = "image_tower" if config.image_tower.lora is not None else "text_tower"
        raise ImportError(f"image_text.{tower}.lora: {why}")
    try:
        with torch.device("meta"):
            skeleton()
    except ValueError as e:
        raise ValueError(f"image_text.{e}") from None


def hf_clip_tokenizer(config: ClipSource) -> TextTokenizer:
    """The checkpoint's own tokenizer, truncating at the model's context length (SigLIP's texts
    padded to it, as it was trained)."""
    from transformers import AutoConfig, AutoTokenizer

    source, local = resolve_hf_clip(config), not config.download
    model_config = AutoConfig.from_pretrained(source, local_files_only=local)
    context = model_config.text_config.max_position_embeddings
    return TextTokenizer(tokenizer=AutoTokenizer.from_pretrained(source, local_files_only=local), max_length=context,
                         pad_to_max_length=not HF_DUAL_ENCODERS[model_config.model_type][3])


def absolute_hf_clip(spec: str) -> str:
    """A CLIP directory made absolute (a Hub name unchanged)."""
    return absolute(spec) if os.path.isdir(os.path.expanduser(spec)) else spec


def absolute_open_clip(spec: str) -> str:
    """open_clip's `local-dir:/path` or `NAME:/path/to/checkpoint.pt` made absolute."""
    if spec.startswith("local-dir:"):
        return "local-dir:" + absolute(spec.removeprefix("local-dir:"))
    name, _, checkpoint = spec.partition(":")
    local = checkpoint and not spec.startswith("hf-hub:") and os.path.isfile(os.path.expanduser(checkpoint))
    return f"{name}:{absolute(checkpoint)}" if local else spec


OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")  # a model and its weights together, as open_clip names them


def open_clip_spec(config: ClipSource) -> tuple[str, str | None]:
    """`image_text.pretrained` as open_clip's (model name, pretrained tag or checkpoint path):
    "ViT-B-32:laion2b_s34b_b79k", "ViT-B-32:/path/open_clip.pt", a bare name (random weights), or
    "hf-hub:org/repo" / "local-dir:/path" (config and weights together: the name alone)."""
    spec = config.pretrained or ""
    if spec.startswith(OPEN_CLIP_SCHEMAS):
        return spec, None
    name, _, pretrained = spec.partition(":")
    return name, os.path.expanduser(pretrained) or None


@contextmanager
def _quiet_root_logger():
    """open_clip logs every step of building a model at INFO on the root logger (worker consoles)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ImportError("image_text.towers: open_clip needs the open_clip package: pip install open_clip_torch") from None
    return open_clip


def register_open_clip_config(config: ClipSource) -> None:
    """Make `image_text.open_clip_config` (a model config JSON, open_clip's format) known under its
    file's stem, in this process (every worker calls this before building)."""
    if config.open_clip_config:
        _open_clip().add_model_config(os.path.expanduser(config.open_clip_config))


def check_open_clip(config: ClipSource, loss_name: str) -> None:
    """Before Ray starts: the model is known, its weights reachable, and a SigLIP one trains with
    the sigmoid loss."""
    open_clip = _open_clip()
    register_open_clip_config(config)
    name, pretrained = open_clip_spec(config)
    if name.startswith("local-dir:") and not os.path.isdir(os.path.expanduser(name.removeprefix("local-dir:"))):
        raise FileNotFoundError(f"image_text.pretrained: {name}: no such directory")
    if not name.startswith(OPEN_CLIP_SCHEMAS):
        model_config = open_clip.get_model_config(name)
        if model_config is None:
            raise ValueError(f"image_text.pretrained: {name!r} is not an open_clip model (known: open_clip.list_models(); "
                             "a custom one: image_text.open_clip_config)")
        if model_config.get("init_logit_bias") is not None and loss_name != "siglip":
            raise _siglip_error(name)
    if (name.startswith("hf-hub:") or (pretrained and not os.path.isfile(pretrained))) and not config.download:
        raise FileNotFoundError(
            f"image_text.pretrained: {config.pretrained!r} names weights on the Hugging Face Hub, and "
            "image_text.download is false: set it true (the Hub cache is read first), or give a checkpoint path "
            "(NAME:/path/to/open_clip.pt)")
    check_clip_lora(config, lambda: OpenClipTowers(config, {"name": name, "model_config": open_clip.get_model_config(name)}))


class OpenClipTowers(PretrainedClip):
    """An open_clip model (`create_model_and_transforms(name, pretrained=...)`), or with
    `architecture` its model config alone (weights loaded afterwards)."""

    def __init__(self, config: ClipSource, architecture: dict | None = None) -> None:
        open_clip = _open_clip()
        if architecture is None:
            register_open_clip_config(config)
            name, pretrained = open_clip_spec(config)
            with _quiet_root_logger():
                model = open_clip.create_model(name, pretrained=pretrained,
                                               load_weights=pretrained is not None or name.startswith(OPEN_CLIP_SCHEMAS))
        else:
            name = architecture["name"]
            # (hf-hub: and local-dir: models keep their config beside their weights: read from there)
            if architecture["model_config"] is not None and open_clip.get_model_config(name) is None:
                with tempfile.TemporaryDirectory() as d:
                    with open(os.path.join(d, f"{name}.json"), "w") as f:
                        json.dump(architecture["model_config"], f)
                    open_clip.add_model_config(d)
            with _quiet_root_logger():
                # (on the default device: the meta device where check_clip_lora builds a skeleton)
                model = open_clip.create_model(name, pretrained=None, load_weights=False, device=torch.get_default_device())
        preprocess = model.visual.preprocess_cfg
        size = preprocess["size"]
        super().__init__(size if isinstance(size, int) else size[0], preprocess["mean"], preprocess["std"], config)
        self.model, self.name = model, name
        self.logit_scale = model.logit_scale
        if getattr(model, "logit_bias", None) is not None:  # a SigLIP
            self.logit_bias = model.logit_bias
        self._adapt_and_lock(config)

    def image_modules(self) -> list[nn.Module]:
        return [self.base.visual]

    def _image_features(self, pixels: Tensor) -> Tensor:
        return self.base.encode_image(pixels)

    def _text_features(self, tokens: dict) -> Tensor:
        return self.base.encode_text(tokens["input_ids"])

    def architecture(self) -> dict:
        return {"name": self.name, "model_config": _open_clip().get_model_config(self.name)}

    def export(self, directory: str, tokenizer) -> str:
        """open_clip.pt: `open_clip.create_model_and_transforms(name, pretrained=path)` loads it."""
        path = os.path.join(directory, "open_clip.pt")
        torch.save(self.base.state_dict(), path)  # (merged towers: no adapters)
        return path


class OpenClipTokenizer:
    """open_clip's tokenizer for the model: every caption padded to its context length."""

    def __init__(self, config: ClipSource) -> None:
        name = open_clip_spec(config)[0]
        if _open_clip().get_model_config(name) is None:  # (load_towers has registered the saved one)
            register_open_clip_config(config)
        self.tokenizer = _open_clip().get_tokenizer(name)

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        return {"input_ids": self.tokenizer(list(texts))}
