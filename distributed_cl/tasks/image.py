"""Image task: SimCLR-style two views of one image (Fashion-MNIST, or sklearn's digits for tests),
evaluated by kNN top-1 of the encoder's features against raw pixels."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distributed_cl.config import Config
from distributed_cl.data.augment import BatchTwoViews
from distributed_cl.data.images import TwoViews, load_images, to_float, two_view_transform
from distributed_cl.evaluate import sharded_knn_top1
from distributed_cl.models import build_encoder, build_head, save_encoder
from distributed_cl.tasks.base import Task

ENCODER_FILE = "encoder.pt"


class ImageTowers(nn.Module):
    """One encoder (evaluated and exported) and a projection head (seen by the loss only)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, view_a: Tensor, view_b: Tensor) -> tuple[Tensor, Tensor]:
        z = self.head(self.encoder(torch.cat([view_a, view_b])))  # one pass: BatchNorm sees both views
        return z.chunk(2)


class DeviceBatches:
    """The whole training set on the device (Fashion-MNIST is 47 MB as uint8): each step gathers
    the sampler's indices and makes both views for the batch at once, with no per-sample Python."""

    def __init__(self, images: Tensor, labels: Tensor, batch_sampler: Iterable[list[int]], views: BatchTwoViews):
        self.images, self.labels, self.batch_sampler, self.views = images, labels, batch_sampler, views

    def __iter__(self):
        for indices in self.batch_sampler:
            index = torch.as_tensor(indices).to(self.images.device, non_blocking=True)  # no wait for the GPU
            view_a, view_b = self.views(self.images[index])
            yield {"a": view_a, "b": view_b, "labels": self.labels[index]}


class ImageTask(Task):
    name = "image"
    metric_names = ("knn_top1",)
    baseline_name = "raw_pixels"

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device="cpu") -> None:
        super().__init__(config, rank, world, device)
        d = config.data
        self.data = load_images(d)
        if d.train_subset:
            n = d.train_subset
            self.data = replace(self.data, train_images=self.data.train_images[:n], train_labels=self.data.train_labels[:n])
        g = torch.Generator().manual_seed(config.train.seed)
        self.bank = torch.randperm(len(self.data.train_images), generator=g)[: d.eval_bank_size or None]
        self.test = torch.arange(len(self.data.test_images))[: d.eval_test_size or None]

    @property
    def train_labels(self) -> Tensor:
        return self.data.train_labels

    def train_batches(self, batch_sampler: Iterable[list[int]]) -> Iterable[dict]:
        d, size = self.config.data, self.data.image_size
        if d.pipeline == "per_sample":  # torchvision v2 per image in a DataLoader: the slow reference path
            views = TwoViews(self.data.train_images, self.data.train_labels,
                             two_view_transform(size, d.crop_scale_min, d.jitter, d.blur))
            return DataLoader(views, batch_sampler=batch_sampler)
        return DeviceBatches(self.data.train_images.to(self.device), self.data.train_labels.to(self.device),
                             batch_sampler, BatchTwoViews(size, d.crop_scale_min, d.jitter, blur=d.blur))

    @staticmethod
    def build_towers(config: Config) -> ImageTowers:
        encoder = build_encoder(config.model)
        return ImageTowers(encoder, build_head(encoder, config.model))

    def _knn(self, features_of) -> float:
        d = self.data
        return sharded_knn_top1(features_of, d.train_images[self.bank], d.train_labels[self.bank],
                                d.test_images[self.test], d.test_labels[self.test], self.rank, self.world,
                                self.device, self.config.train.knn_k)

    def evaluate(self, towers: ImageTowers) -> dict[str, float]:
        return {"knn_top1": self._knn(lambda images: towers.encoder(to_float(images).to(self.device)))}

    def baselines(self) -> dict[str, float]:
        return {"knn_top1_raw_pixels": self._knn(lambda images: to_float(images).flatten(1).to(self.device))}

    def export(self, towers: ImageTowers, directory: str) -> None:
        super().export(towers, directory)
        save_encoder(towers.encoder, self.config.model, 1, os.path.join(directory, ENCODER_FILE))
