"""Image-text task: images and their captions (emoji and their CLDR names, or your own pairs)
through a dual encoder (a torchvision image tower, the MiniLM text tower, projections to a shared
space), evaluated by image -> text and text -> image retrieval over held-out pairs against chance."""

from __future__ import annotations

from torch import Tensor, nn

from distributed_cl.config import Config
from distributed_cl.data.augment import BatchTwoViews
from distributed_cl.data.images import to_float
from distributed_cl.data.sources import emoji_captions
from distributed_cl.data.table import Splits, Table
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


class ImageTextTask(Task):
    name = "image_text"
    sides = ("image", "text")
    builtin = staticmethod(emoji_captions)

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device="cpu", data: Splits | None = None) -> None:
        super().__init__(config, rank, world, device, data)
        x = config.image_text
        self.tokenize = TextTokenizer(x.text_tower)
        # mild crops only: no flips (arrows, hands) and no colour jitter (colour names the emoji)
        self.crop = BatchTwoViews(self.data.test.a.shape[-1], x.crop_scale_min, jitter=0, flip=False, ratio=(0.9, 1.1))

    @classmethod
    def metric_names(cls, config: Config) -> tuple[str, ...]:
        return ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5")

    def collate(self, rows: Table) -> dict:
        return {"a": rows.a, "b": self.tokenize(rows.b), "labels": rows.labels}

    def augment(self, batch: dict) -> dict:
        return batch | {"a": self.crop.view(to_float(batch["a"]))}

    @staticmethod
    def build_towers(config: Config) -> DualEncoder:
        return DualEncoder(config)

    def evaluate(self, towers: DualEncoder) -> dict[str, float]:
        test = self.data.test
        images = sharded_embed(lambda x: towers.embed_images(to_float(x).to(self.device)), test.a,
                               self.rank, self.world, self.device)
        texts = sharded_embed(lambda x: towers.embed_texts(to_device(self.tokenize(x), self.device)), test.b,
                              self.rank, self.world, self.device)
        i2t, t2i = recall_at_k(images, texts, (1, 5)), recall_at_k(texts, images, (1, 5))
        return {"i2t_recall@1": i2t[1], "i2t_recall@5": i2t[5], "t2i_recall@1": t2i[1], "t2i_recall@5": t2i[5]}

    def baselines(self) -> dict[str, float]:
        n = len(self.data.test)
        return {f"{d}_recall@{k}_baseline": min(1.0, k / n) for d in ("i2t", "t2i") for k in (1, 5)}  # chance
