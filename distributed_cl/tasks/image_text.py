"""Image-text task: images and their captions (emoji and their CLDR names, or your own pairs)
through a dual encoder, evaluated by image -> text and text -> image retrieval over held-out pairs
against chance, and, where the rows have labels, by zero-shot classification: each held-out image
takes the class whose prompt ("a photo of a {label}.") its embedding is nearest.

The towers (`image_text.towers`, registered once in TOWERS): `scratch` (a torchvision image tower
and the MiniLM text tower with projections to a shared space), or a pretrained CLIP from
transformers (`hf_clip`) or open_clip (`open_clip`), with its own preprocessing and tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from distributed_cl.data.augment import BatchTwoViews
from distributed_cl.data.emoji import load_emoji
from distributed_cl.data.images import to_float
from distributed_cl.data.table import Splits, Table
from distributed_cl.evaluate import recall_at_k, sharded_embed, zero_shot_top1
from distributed_cl.model_card import Export
from distributed_cl.models import TextTokenizer, TextTower, build_encoder, build_head
from distributed_cl.models.clip import (
    HFClipTowers,
    OpenClipTokenizer,
    OpenClipTowers,
    absolute_hf_clip,
    absolute_open_clip,
    check_hf_clip,
    check_open_clip,
    hf_clip_tokenizer,
    open_clip_spec,
)
from distributed_cl.models.image import ImageEncoderOptions
from distributed_cl.models.lora import LoraOptions
from distributed_cl.models.text import TextTowerOptions
from distributed_cl.options import Options, absolute, choice, field_error
from distributed_cl.tasks.base import TOWERS_SNIPPET, Config, Task, pair_extras, to_device


class DualEncoder(nn.Module):
    """`model(images, tokens) -> (image_z, text_z)` in one shared space (CLIP's layout)."""

    def __init__(self, config: ImageTextOptions, architecture: dict | None = None) -> None:
        super().__init__()
        self.image_encoder = build_encoder(config.image_tower, in_channels=3, load_weights=architecture is None)
        self.image_projection = build_head(self.image_encoder, config.image_tower)
        self.text_tower = TextTower(config.text_tower, None if architecture is None else architecture["text"])
        self.text_projection = nn.Linear(self.text_tower.out_dim, config.image_tower.projection_dim)
        self.lr_mult = {"image": config.image_tower.lr_mult, "text": config.text_tower.lr_mult}

    def embed_images(self, images: Tensor) -> Tensor:
        return self.image_projection(self.image_encoder(images))

    def embed_texts(self, tokens: dict) -> Tensor:
        return self.text_projection(self.text_tower(tokens))

    def forward(self, images: Tensor, tokens: dict) -> tuple[Tensor, Tensor]:
        return self.embed_images(images), self.embed_texts(tokens)

    def embed_b(self, tokens: dict) -> Tensor:
        """Captions (the rows' hard negatives)."""
        return self.embed_texts(tokens)

    def lr_mults(self) -> list[tuple[list[nn.Parameter], float]]:
        # the projections are new layers: only the encoders' pretrained weights take a multiplier
        return [(list(self.image_encoder.parameters()), self.lr_mult["image"]),
                (list(self.text_tower.parameters()), self.lr_mult["text"])]

    def architecture(self) -> dict:
        return {"text": self.text_tower.architecture()}


@dataclass(frozen=True)
class TowerChoice:
    """One `image_text.towers` choice: how to build the towers (from the pretrained source, or from
    a saved architecture), the captions' tokenizer, the check run before Ray starts, and what it
    does with `image_text.pretrained`."""

    build: Callable[[ImageTextOptions, dict | None], nn.Module]
    tokenizer: Callable[[ImageTextOptions], Callable[[list[str]], dict]]
    check: Callable[[ImageTextOptions, str], None] | None = None  # (image_text section, loss.name)
    pretrained: bool = True  # it starts from image_text.pretrained (else from image_tower / text_tower)
    absolute_pretrained: Callable[[str], str] = str  # local paths in image_text.pretrained made absolute
    # the tokenizer of a saved towers.pt: None rebuilds it from the tokenizer's saved files
    saved_tokenizer: Callable[[ImageTextOptions], Callable[[list[str]], dict]] | None = None


TOWERS: dict[str, TowerChoice] = {
    "scratch": TowerChoice(DualEncoder, lambda x: TextTokenizer(x.text_tower), pretrained=False),
    "hf_clip": TowerChoice(HFClipTowers, hf_clip_tokenizer, check_hf_clip, absolute_pretrained=absolute_hf_clip),
    # open_clip's tokenizers ship with the package
    "open_clip": TowerChoice(OpenClipTowers, OpenClipTokenizer, check_open_clip, absolute_pretrained=absolute_open_clip,
                             saved_tokenizer=OpenClipTokenizer),
}


class ImageTowerOptions(ImageEncoderOptions):
    projection_dim: PositiveInt = 256  # the shared space of both towers
    # LoRA adapters on a pretrained CLIP's image tower (towers: hf_clip, open_clip; `text_tower.lora`
    # on its text tower): only the adapters and the logit scale train
    lora: LoraOptions | None = None


class CaptionTowerOptions(TextTowerOptions):
    max_length: int = Field(32, ge=2)
    freeze: bool = True

    @model_validator(mode="after")
    def _no_prompts(self) -> CaptionTowerOptions:
        if self.prompts.a or self.prompts.b:
            raise field_error("prompts", "are the text task's (its two sides' instructions); captions take none")
        return self


class ImageTextOptions(Options):
    """The `image_text` section: emoji rendered from Noto Color Emoji, captioned by their CLDR
    names; the towers trained from scratch or fine-tuned from a pretrained CLIP."""

    # scratch: image_tower + text_tower below | hf_clip: a transformers CLIPModel | open_clip: an open_clip model
    towers: Annotated[str, choice(TOWERS)] = "scratch"
    # hf_clip: a directory saved by CLIPModel.save_pretrained, or a Hub name (openai/clip-vit-base-patch32);
    # open_clip: NAME:TAG or NAME:/path/to/checkpoint.pt (ViT-B-32:laion2b_s34b_b79k), hf-hub:org/repo, local-dir:/path
    pretrained: str | None = None
    download: bool = False  # allow fetching `pretrained` from the Hugging Face Hub
    open_clip_config: str | None = None  # open_clip: a model config JSON of your own, known by its file's stem
    lock_image: bool = False  # freeze the image tower (with a trained text tower: LiT)
    lock_text: bool = False  # freeze the text tower
    zeroshot_template: str = "a photo of a {}."  # labelled rows: the class prompts of zeroshot_top1

    font: str = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian fonts-noto-color-emoji
    image_size: int = Field(32, ge=8)
    test_size: int = Field(300, ge=2)  # held-out emoji
    max_train: PositiveInt | None = None  # keep only the first N training emoji (tiny runs)
    crop_scale_min: float = Field(0.6, gt=0, le=1)  # RandomResizedCrop scale=(crop_scale_min, 1) on training images
    cache_dir: str = "~/.cache/distributed_cl"  # rendered emoji are cached here
    image_tower: ImageTowerOptions = Field(default_factory=ImageTowerOptions)
    text_tower: CaptionTowerOptions = Field(default_factory=CaptionTowerOptions)

    @model_validator(mode="after")
    def _towers(self) -> ImageTextOptions:
        if "{}" not in self.zeroshot_template:
            raise field_error("zeroshot_template", f"must hold {{}} for the class name, got {self.zeroshot_template!r}")
        if self.lock_image and self.lock_text:
            raise ValueError("image_text.lock_image and image_text.lock_text are both true: nothing would train")
        if TOWERS[self.towers].pretrained and not self.pretrained:
            raise field_error("towers", f"{self.towers} needs image_text.pretrained (a model directory, a Hub name "
                              "with image_text.download=true, or for open_clip NAME:TAG / NAME:/path/to/ckpt.pt)")
        if not TOWERS[self.towers].pretrained and (self.lock_image or self.lock_text):
            raise ValueError("image_text.lock_image / lock_text lock pretrained towers (hf_clip, open_clip); scratch "
                             "towers train both sides, or freeze the text one: image_text.text_tower.freeze")
        if self.image_tower.lora is not None and not TOWERS[self.towers].pretrained:
            raise field_error("image_tower.lora", "adapts a pretrained CLIP's image tower (towers: hf_clip "
                              "or open_clip); the scratch image tower is a CNN that trains in full")
        for tower, locked in (("image", self.lock_image), ("text", self.lock_text)):
            if locked and getattr(self, f"{tower}_tower").lora is not None:
                raise field_error(f"{tower}_tower.lora", "trains adapters on the tower that "
                                  f"image_text.lock_{tower} keeps fixed: drop one")
        if not TOWERS[self.towers].pretrained and self.pretrained is not None:
            raise field_error("pretrained", "needs image_text.towers: hf_clip or open_clip (scratch towers read "
                              "image_text.image_tower and image_text.text_tower)")
        return self

    def absolute_paths(self) -> ImageTextOptions:
        pretrained = self.pretrained and TOWERS[self.towers].absolute_pretrained(self.pretrained)
        return self.model_copy(update={"font": absolute(self.font), "cache_dir": absolute(self.cache_dir),
                                       "pretrained": pretrained,
                                       "open_clip_config": self.open_clip_config and absolute(self.open_clip_config)})


class ImageTextTask(Task):
    name = "image_text"
    builtin_data = "emoji"
    sections = {"image_text": ImageTextOptions}
    sides = ("image", "text")

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device="cpu", data: Splits | None = None) -> None:
        super().__init__(config, rank, world, device, data)
        x = config.image_text
        self.tokenize = self.tokenizer(config)
        # mild crops only: no flips (arrows, hands) and no colour jitter (colour names the emoji)
        self.crop = BatchTwoViews(self.data.test.a.shape[-1], x.crop_scale_min, jitter=0, flip=False, ratio=(0.9, 1.1))

    @staticmethod
    def builtin(config: Config) -> Splits:
        """Emoji drawn from Noto Color Emoji with their CLDR names. Every emoji is its own class."""
        x = config.image_text
        data = load_emoji(x.font, x.image_size, x.test_size, seed=config.train.seed, cache_dir=x.cache_dir,
                          max_train=x.max_train)
        train, test = (Table(p.images, p.captions) for p in (data.train, data.test))
        return Splits(train, test, train_rows=len(train))

    @classmethod
    def check_files(cls, config: Config) -> None:
        x = config.image_text
        if config.dataset is None and not Path(x.font).expanduser().is_file():
            raise FileNotFoundError(f"image_text.font: {x.font} does not exist (apt-get install "
                                    "fonts-noto-color-emoji, or point image_text.font at NotoColorEmoji.ttf)")
        if not TOWERS[x.towers].pretrained:
            x.image_tower.check("image_text.image_tower")
            x.text_tower.check("image_text.text_tower")
        elif TOWERS[x.towers].check is not None:
            TOWERS[x.towers].check(x, config.loss.name)

    @classmethod
    def metric_names(cls, config: Config) -> tuple[str, ...]:
        retrieval = ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5")
        return retrieval + (("zeroshot_top1",) if cls.labelled(config) else ())

    def collate(self, rows: Table) -> dict:
        return {"a": rows.a, "b": self.tokenize(rows.b), "labels": rows.labels, **pair_extras(rows, self.tokenize)}

    def augment(self, batch: dict) -> dict:
        return batch | {"a": self.crop.view(to_float(batch["a"]))}

    @staticmethod
    def build_towers(config: Config, architecture: dict | None = None) -> nn.Module:
        return TOWERS[config.image_text.towers].build(config.image_text, architecture)

    @classmethod
    def tokenizer(cls, config: Config):
        return TOWERS[config.image_text.towers].tokenizer(config.image_text)

    @staticmethod
    def encode(towers: nn.Module, side: str, values, tokenize, device) -> Tensor:
        if side == "a":  # images
            return towers.embed_images(to_float(values).to(device))
        return towers.embed_texts(to_device(tokenize(values), device))

    def _embed_texts(self, towers: nn.Module, texts: list[str]) -> Tensor:
        return sharded_embed(lambda x: self.encode(towers, "b", x, self.tokenize, self.device), texts,
                             self.rank, self.world, self.device)

    def class_prompts(self) -> tuple[list[str], Tensor]:
        """One prompt per class of the held-out split and the kNN bank, from the data's label
        names (or the ids as text), and the class ids in the same order."""
        tables = [t for t in (self.data.test, self.data.bank) if t is not None]
        classes = torch.cat([t.labels for t in tables]).unique()
        names = {k: v for t in tables for k, v in t.label_names.items()}
        template = self.config.image_text.zeroshot_template
        return [template.format(names.get(int(c), str(int(c)))) for c in classes], classes

    def evaluate(self, towers: nn.Module) -> dict[str, float]:
        test = self.data.test.matching()
        images = sharded_embed(lambda x: self.encode(towers, "a", x, None, self.device), test.a,
                               self.rank, self.world, self.device)
        texts = self._embed_texts(towers, test.b)
        i2t, t2i = recall_at_k(images, texts, (1, 5)), recall_at_k(texts, images, (1, 5))
        metrics = {"i2t_recall@1": i2t[1], "i2t_recall@5": i2t[5], "t2i_recall@1": t2i[1], "t2i_recall@5": t2i[5]}
        if self.labelled(self.config):
            prompts, classes = self.class_prompts()
            metrics["zeroshot_top1"] = zero_shot_top1(images, self._embed_texts(towers, prompts), classes, test.labels)
        return metrics

    def baselines(self) -> dict[str, float]:
        test = self.data.test.matching()
        n = len(test)
        chance = {f"{d}_recall@{k}_baseline": min(1.0, k / n) for d in ("i2t", "t2i") for k in (1, 5)}
        if self.labelled(self.config):  # every image given the most common class
            chance["zeroshot_top1_baseline"] = test.labels.unique(return_counts=True)[1].max().item() / n
        return chance

    @staticmethod
    def saved_tokenizer(config: Config, state: dict | None):
        saved = TOWERS[config.image_text.towers].saved_tokenizer
        return saved(config.image_text) if saved is not None else Task.saved_tokenizer(config, state)

    def export(self, towers: nn.Module, directory: str) -> None:
        super().export(towers, directory)
        if hasattr(towers, "export"):  # hf_clip/ or open_clip.pt, loaded by their own libraries
            towers.export(directory, getattr(self.tokenize, "tokenizer", None))

    def exports(self, towers: nn.Module) -> list[Export]:
        x = self.config.image_text
        if x.towers == "hf_clip":
            padding = '"max_length"' if getattr(towers, "model_type", "clip") == "siglip" else "True"
            load = ("from PIL import Image\nfrom transformers import AutoModel, AutoProcessor\n\n"
                    'model = AutoModel.from_pretrained("{path}")\nprocessor = AutoProcessor.from_pretrained("{path}")\n'
                    'inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=Image.new("RGB", (224, 224)),\n'
                    f'                   return_tensors="pt", padding={padding})\n'
                    "probs = model(**inputs).logits_per_image.softmax(dim=-1)")
            return [Export("hf_clip", "transformers", "zero-shot-image-classification", load, "CLIP (transformers)"),
                    *super().exports(towers)]
        if x.towers == "open_clip":
            name = open_clip_spec(x)[0]
            load = (f'{self._open_clip_import()}model, _, preprocess = open_clip.create_model_and_transforms("{name}", '
                    f'pretrained="{{path}}/open_clip.pt")\ntokenizer = open_clip.get_tokenizer("{name}")')
            return [Export("", "open_clip", "zero-shot-image-classification", load, "CLIP (open_clip)")]
        return [Export("", "pytorch", "zero-shot-image-classification", TOWERS_SNIPPET, "image and text towers")]

    def _open_clip_import(self) -> str:
        x = self.config.image_text
        register = f'open_clip.add_model_config("{x.open_clip_config}")  # its architecture\n' if x.open_clip_config else ""
        return f"import open_clip\n\n{register}"

    @property
    def adapter_base(self) -> str | None:
        """open_clip's model (transformers' CLIPModel and SiglipModel load as AutoModel)."""
        if self.config.image_text.towers != "open_clip":
            return None
        name, pretrained = open_clip_spec(self.config.image_text)
        return f'{self._open_clip_import()}base = open_clip.create_model("{name}", pretrained={pretrained!r})\n'

    @property
    def base_model(self) -> str | None:
        return self.config.image_text.pretrained if TOWERS[self.config.image_text.towers].pretrained else None
