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

import torch
from torch import Tensor, nn

from distributed_cl.config import Config, ImageTextConfig
from distributed_cl.data.augment import BatchTwoViews
from distributed_cl.data.images import to_float
from distributed_cl.data.sources import emoji_captions
from distributed_cl.data.table import Splits, Table
from distributed_cl.evaluate import recall_at_k, sharded_embed, zero_shot_top1
from distributed_cl.models import TextTokenizer, TextTower, build_encoder, build_head
from distributed_cl.models.clip import (
    HFClipTowers,
    OpenClipTokenizer,
    OpenClipTowers,
    check_hf_clip,
    check_open_clip,
    hf_clip_tokenizer,
)
from distributed_cl.tasks.base import Task, pair_extras, to_device


class DualEncoder(nn.Module):
    """`model(images, tokens) -> (image_z, text_z)` in one shared space (CLIP's layout)."""

    def __init__(self, config: ImageTextConfig, architecture: dict | None = None) -> None:
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
    a saved architecture), the captions' tokenizer, and the check run before Ray starts."""

    build: Callable[[ImageTextConfig, dict | None], nn.Module]
    tokenizer: Callable[[ImageTextConfig], Callable[[list[str]], dict]]
    check: Callable[[ImageTextConfig, str], None] | None = None  # (image_text section, loss.name)


TOWERS: dict[str, TowerChoice] = {
    "scratch": TowerChoice(DualEncoder, lambda x: TextTokenizer(x.text_tower)),
    "hf_clip": TowerChoice(HFClipTowers, hf_clip_tokenizer, check_hf_clip),
    "open_clip": TowerChoice(OpenClipTowers, OpenClipTokenizer, check_open_clip),
}


class ImageTextTask(Task):
    name = "image_text"
    sides = ("image", "text")
    builtin = staticmethod(emoji_captions)

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device="cpu", data: Splits | None = None) -> None:
        super().__init__(config, rank, world, device, data)
        x = config.image_text
        self.tokenize = TOWERS[x.towers].tokenizer(x)
        # mild crops only: no flips (arrows, hands) and no colour jitter (colour names the emoji)
        self.crop = BatchTwoViews(self.data.test.a.shape[-1], x.crop_scale_min, jitter=0, flip=False, ratio=(0.9, 1.1))

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

    def _embed_texts(self, towers: nn.Module, texts: list[str]) -> Tensor:
        return sharded_embed(lambda x: towers.embed_texts(to_device(self.tokenize(x), self.device)), texts,
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
        images = sharded_embed(lambda x: towers.embed_images(to_float(x).to(self.device)), test.a,
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
        if config.image_text.towers == "open_clip":  # open_clip's tokenizers ship with the package
            return OpenClipTokenizer(config.image_text)
        return Task.saved_tokenizer(config, state)

    def export(self, towers: nn.Module, directory: str) -> None:
        super().export(towers, directory)
        if hasattr(towers, "export"):  # hf_clip/ or open_clip.pt, loaded by their own libraries
            towers.export(directory, getattr(self.tokenize, "tokenizer", None))
