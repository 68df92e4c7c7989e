"""Image task: SimCLR-style two views of one image, evaluated by kNN top-1 of the encoder's
features against raw pixels (labelled data), or by finding each held-out image's second view
among all held-out views (unlabelled data)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeInt
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distributed_cl.data.augment import BatchTwoViews
from distributed_cl.data.images import IMAGE_DATASETS, ImageData, TwoViews, to_float, two_view_transform
from distributed_cl.data.table import Splits, Table
from distributed_cl.evaluate import recall_at_k, sharded_embed, sharded_knn_top1
from distributed_cl.model_card import Export
from distributed_cl.models import build_encoder, build_head, save_encoder
from distributed_cl.models.image import ImageEncoderOptions
from distributed_cl.options import Options, absolute, choice
from distributed_cl.tasks.base import Config, Task

ENCODER_FILE = "encoder.pt"
VIEW_SEED = 1234  # the held-out views of `view_recall@1`, the same for every model compared


class ImageDataOptions(Options):
    """The `data` section: the image task's built-in data and its augmentations."""

    name: Annotated[str, choice(IMAGE_DATASETS)] = "fashion_mnist"  # digits: sklearn's, tiny, for tests
    root: str = "/usr/share/datasets/fashion-mnist"  # IDX files (.gz or not); Debian dataset-fashion-mnist
    download: bool = False  # fetch from torchvision's online mirrors into cache_dir instead
    cache_dir: str = "~/.cache/distributed_cl"
    # batched: data on the device, views made per batch there | per_sample: DataLoader + v2
    pipeline: Literal["batched", "per_sample"] = "batched"
    crop_scale_min: float = Field(0.5, gt=0, le=1)  # RandomResizedCrop scale=(crop_scale_min, 1)
    jitter: float = Field(0.4, ge=0, le=1)  # brightness and contrast jitter (blocks the intensity-histogram shortcut)
    blur: float = Field(0.0, ge=0, le=5)  # Gaussian blur, sigma up to this many pixels, on half of the views; 0: none
    train_subset: NonNegativeInt = 0  # train on the first N training images only (0: all), e.g. for quick sweeps
    eval_bank_size: NonNegativeInt = 10000  # training images in the kNN bank (0: all)
    eval_test_size: NonNegativeInt = 10000  # held-out images scored by kNN (0: all)

    def absolute_paths(self) -> ImageDataOptions:
        return self.model_copy(update={"root": absolute(self.root), "cache_dir": absolute(self.cache_dir)})

    def load(self) -> ImageData:
        return IMAGE_DATASETS[self.name](self.root, self.cache_dir, self.download)


def image_channels(config: Config) -> int:
    """The built-in data is grayscale; your own images are decoded to RGB."""
    return 1 if config.dataset is None else 3


class ImageTowers(nn.Module):
    """One encoder (evaluated and exported) and a projection head (seen by the loss only)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, encoder_lr_mult: float = 1.0) -> None:
        super().__init__()
        self.encoder, self.head, self.encoder_lr_mult = encoder, head, encoder_lr_mult

    def lr_mults(self) -> list[tuple[list[nn.Parameter], float]]:
        return [(list(self.encoder.parameters()), self.encoder_lr_mult)]  # the head is new: full rate

    def architecture(self) -> dict:
        return {}  # the config says it all

    def forward(self, view_a: Tensor, view_b: Tensor) -> tuple[Tensor, Tensor]:
        z = self.head(self.encoder(torch.cat([view_a, view_b])))  # one pass: BatchNorm sees both views
        return z.chunk(2)


class ImageTask(Task):
    """Metrics: `knn_top1` where the held-out images have labels (20 nearest bank images vote);
    without labels `view_recall@1`: each held-out image is augmented twice (a fixed seed) and its
    first view must find its second among the second views of all held-out images, the
    invariance SimCLR trains for, measured on images it never saw."""

    name = "image"
    sections = {"data": ImageDataOptions, "model": ImageEncoderOptions}
    summary_files = {"encoder": ENCODER_FILE}
    baseline_name = "raw_pixels"
    sides = ("image", None)
    builtin_labelled = True

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device="cpu", data: Splits | None = None) -> None:
        super().__init__(config, rank, world, device, data)
        d = config.data
        self.image_size = self.data.test.a.shape[-1]
        self.views = BatchTwoViews(self.image_size, d.crop_scale_min, d.jitter, blur=d.blur)

    @classmethod
    def unshardable(cls, config: Config) -> str | None:
        return (f"the image task's encoder ({config.model.encoder}) is a CNN without repeated transformer blocks "
                "to shard, small enough to train whole on each worker")

    @staticmethod
    def builtin(config: Config) -> Splits:
        """Fashion-MNIST (or sklearn's digits), grayscale 28x28. The kNN bank is a seeded sample of
        the training images."""
        d = config.data
        data = d.load()
        train = Table(data.train_images, labels=data.train_labels, labelled=True)
        if d.train_subset:
            train = train.head(d.train_subset)
        bank = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.train.seed))
        test = Table(data.test_images, labels=data.test_labels, labelled=True)
        return Splits(train, test.head(d.eval_test_size or len(test)),
                      bank=train.take(bank[: d.eval_bank_size or None]), train_rows=len(train))

    @classmethod
    def check_files(cls, config: Config) -> None:
        d = config.data
        if config.dataset is None and d.name == "fashion_mnist" and not d.download and not Path(d.root).is_dir():
            raise FileNotFoundError(f"data.root: {d.root} does not exist (install Debian's dataset-fashion-mnist, "
                                    "point data.root at the IDX files, or set data.download=true)")
        config.model.check("model")

    @classmethod
    def metric_names(cls, config: Config) -> tuple[str, ...]:
        return ("knn_top1",) if cls.labelled(config) else ("view_recall@1",)

    def collate(self, rows: Table) -> dict:
        return {"a": rows.a, "labels": rows.labels}

    def augment(self, batch: dict) -> dict:
        view_a, view_b = self.views(batch["a"])
        return {"a": view_a, "b": view_b, "labels": batch["labels"]}

    def train_batches(self, batch_sampler: Iterable[list[int]]) -> Iterable[dict]:
        d = self.config.data
        if d.pipeline == "per_sample":  # torchvision v2 per image in a DataLoader: the slow reference path
            train = self.data.train
            views = TwoViews(train.a, train.labels, two_view_transform(self.image_size, d.crop_scale_min, d.jitter, d.blur))
            return DataLoader(views, batch_sampler=batch_sampler)
        return super().train_batches(batch_sampler)

    @staticmethod
    def build_towers(config: Config, architecture: dict | None = None) -> ImageTowers:
        encoder = build_encoder(config.model, image_channels(config), load_weights=architecture is None)
        return ImageTowers(encoder, build_head(encoder, config.model), config.model.lr_mult)

    def _knn(self, features_of) -> float:
        bank, test = self.data.bank, self.data.test
        return sharded_knn_top1(features_of, bank.a, bank.labels, test.a, test.labels, self.rank, self.world,
                                self.device, self.config.train.knn_k)

    def _view_recall(self, features_of) -> float:
        with torch.random.fork_rng(devices=[]):  # the training RNG stream is left alone
            torch.manual_seed(VIEW_SEED)
            first, second = self.views(self.data.test.a)
        embed = lambda views: sharded_embed(features_of, views, self.rank, self.world, self.device)  # noqa: E731
        return recall_at_k(embed(first), embed(second), (1,))[1]

    def _score(self, features_of) -> float:
        return self._knn(lambda x: features_of(to_float(x))) if self.labelled(self.config) else self._view_recall(features_of)

    @staticmethod
    def encode(towers: ImageTowers, side: str, values, tokenize, device) -> Tensor:
        """The encoder's features (both sides are views of one image; the head is the loss's only)."""
        return towers.encoder(to_float(values).to(device))

    def evaluate(self, towers: ImageTowers) -> dict[str, float]:
        (name,) = self.metric_names(self.config)
        return {name: self._score(lambda x: towers.encoder(x.to(self.device)))}

    def baselines(self) -> dict[str, float]:
        (name,) = self.metric_names(self.config)
        return {f"{name}_raw_pixels": self._score(lambda x: x.flatten(1).to(self.device))}

    def export(self, towers: ImageTowers, directory: str) -> None:
        super().export(towers, directory)
        save_encoder(towers.encoder, self.config.model, image_channels(self.config), os.path.join(directory, ENCODER_FILE))

    def exports(self, towers: nn.Module) -> list[Export]:
        channels, size = image_channels(self.config), self.image_size
        load = ("import torch\nfrom distributed_cl.models import load_encoder\n\n"
                f'encoder = load_encoder("{{path}}/{ENCODER_FILE}")  # eval mode; towers.pt holds the head too\n'
                f"features = encoder(torch.rand(2, {channels}, {size}, {size}))  # images: (n, C, H, W) floats in [0, 1]")
        return [Export("", "pytorch", "image-feature-extraction", load, f"{self.config.model.encoder} image encoder")]

    @property
    def base_model(self) -> str | None:
        return self.config.model.weights

    @property
    def builtin_data(self) -> str:
        return self.config.data.name
