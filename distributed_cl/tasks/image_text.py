"""Image-text task: emoji images and their CLDR names through a dual encoder (a torchvision image
tower, the MiniLM text tower, projections to a shared space), evaluated by image -> text and
text -> image retrieval over held-out emoji against chance."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from distributed_cl.config import Config
from distributed_cl.data.emoji import load_emoji
from distributed_cl.data.images import to_float
from distributed_cl.evaluate import recall_at_k, sharded_embed
from distributed_cl.models import TextTokenizer, TextTower, build_encoder, projection_head
from distributed_cl.tasks.base import Task, to_device


class DualEncoder(nn.Module):
    """`model(images, tokens) -> (image_z, text_z)` in one shared space (CLIP's layout)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        x = config.image_text
        self.image_encoder = build_encoder(x.image_tower, in_channels=3)
        dim = x.image_tower.projection_dim
        self.image_projection = projection_head(self.image_encoder.out_dim, x.image_tower.projection_hidden, dim)
        self.text_tower = TextTower(x.text_tower)
        self.text_projection = nn.Linear(self.text_tower.out_dim, dim)

    def embed_images(self, images: Tensor) -> Tensor:
        return self.image_projection(self.image_encoder(images))

    def embed_texts(self, tokens: dict) -> Tensor:
        return self.text_projection(self.text_tower(tokens))

    def forward(self, images: Tensor, tokens: dict) -> tuple[Tensor, Tensor]:
        return self.embed_images(images), self.embed_texts(tokens)


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

    def train_batches(self, batch_sampler: Iterable[list[int]]) -> DataLoader:
        train, x = self.data.train, self.config.image_text
        # mild crops only: no flips (arrows, hands) and no colour jitter (colour names the emoji)
        crop = v2.RandomResizedCrop(x.image_size, scale=(x.crop_scale_min, 1.0), ratio=(0.9, 1.1), antialias=True)

        def collate(indices: list[int]) -> dict:
            images = torch.stack([crop(image) for image in to_float(train.images[indices])])  # a crop each
            return {"a": images, "b": self.tokenize([train.captions[i] for i in indices]),
                    "labels": torch.as_tensor(indices)}

        return DataLoader(range(len(train.captions)), batch_sampler=batch_sampler, collate_fn=collate)

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
