"""Image-text task: emoji images and their CLDR names through a dual encoder (a torchvision image
tower, the MiniLM text tower, projections to a shared space), evaluated by image -> text and
text -> image retrieval over held-out emoji against chance."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distributed_cl.config import Config
from distributed_cl.data.augment import BatchTwoViews
from distributed_cl.data.emoji import load_emoji
from distributed_cl.data.images import to_float
from distributed_cl.evaluate import recall_at_k, sharded_embed
from distributed_cl.models import TextTokenizer, TextTower, build_encoder, build_head
from distributed_cl.tasks.base import Task, to_device


class DualEncoder(nn.Module):
    """`model(images, tokens) -> (image_z, text_z)` in one shared space (CLIP's layout)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        x = config.image_text
        self.image_encoder = build_encoder(x.image_tower, in_channels=3)
        self.image_projection = build_head(self.image_encoder, x.image_tower)
        self.text_tower = TextTower(x.text_tower)
        self.text_projection = nn.Linear(self.text_tower.out_dim, x.image_tower.projection_dim)

    def embed_images(self, images: Tensor) -> Tensor:
        return self.image_projection(self.image_encoder(images))

    def embed_texts(self, tokens: dict) -> Tensor:
        return self.text_projection(self.text_tower(tokens))

    def forward(self, images: Tensor, tokens: dict) -> tuple[Tensor, Tensor]:
        return self.embed_images(images), self.embed_texts(tokens)


class CroppedImageBatches:
    """Captions tokenised by the task's loader; the images (a few MB as uint8) held on the device,
    gathered by the batch's indices and randomly cropped there, for the whole batch at once."""

    def __init__(self, captions: DataLoader, images: Tensor, crop: BatchTwoViews) -> None:
        self.captions, self.images, self.crop = captions, images, crop

    def __iter__(self):
        for batch in self.captions:
            index = batch["labels"].to(self.images.device, non_blocking=True)
            yield {"a": self.crop.view(to_float(self.images[index])), "b": batch["b"], "labels": batch["labels"]}


class ImageTextTask(Task):
    name = "image_text"
    metric_names = ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5")

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device="cpu") -> None:
        super().__init__(config, rank, world, device)
        x = config.image_text
        self.data = load_emoji(x.font, x.image_size, x.test_size, seed=config.train.seed, cache_dir=x.cache_dir,
                               max_train=x.max_train)
        self.tokenize = TextTokenizer(x.text_tower)

    @property
    def train_labels(self) -> Tensor:
        return torch.arange(len(self.data.train.captions))  # every emoji is its own class

    def train_batches(self, batch_sampler: Iterable[list[int]]) -> CroppedImageBatches:
        train, x = self.data.train, self.config.image_text
        # mild crops only: no flips (arrows, hands) and no colour jitter (colour names the emoji)
        crop = BatchTwoViews(x.image_size, x.crop_scale_min, jitter=0, flip=False, ratio=(0.9, 1.1))

        def collate(indices: list[int]) -> dict:
            return {"b": self.tokenize([train.captions[i] for i in indices]), "labels": torch.as_tensor(indices)}

        return CroppedImageBatches(self.loader(batch_sampler, collate), train.images.to(self.device), crop)

    @staticmethod
    def build_towers(config: Config) -> DualEncoder:
        return DualEncoder(config)

    def evaluate(self, towers: DualEncoder) -> dict[str, float]:
        test = self.data.test
        images = sharded_embed(lambda x: towers.embed_images(to_float(x).to(self.device)), test.images,
                               self.rank, self.world, self.device)
        texts = sharded_embed(lambda x: towers.embed_texts(to_device(self.tokenize(x), self.device)), test.captions,
                              self.rank, self.world, self.device)
        i2t, t2i = recall_at_k(images, texts, (1, 5)), recall_at_k(texts, images, (1, 5))
        return {"i2t_recall@1": i2t[1], "i2t_recall@5": i2t[5], "t2i_recall@1": t2i[1], "t2i_recall@5": t2i[5]}

    def baselines(self) -> dict[str, float]:
        n = len(self.data.test.captions)
        return {f"{d}_recall@{k}_baseline": min(1.0, k / n) for d in ("i2t", "t2i") for k in (1, 5)}  # chance
