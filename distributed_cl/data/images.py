"""Image data: Fashion-MNIST (torchvision's reader over local IDX files or its online mirrors)
and sklearn's digits (tiny, for tests), as uint8 tensors, plus two-view augmentations."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from torchvision.transforms import v2

_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class ImageData:
    """uint8 images (N, H, W) with int64 labels, split into train and held-out test."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


def fashion_mnist(root: str, cache_dir: str, download: bool = False) -> ImageData:
    """Fashion-MNIST from its IDX files (.gz or not) in `root`, or with `download` from
    torchvision's online mirrors into `cache_dir`."""
    from torchvision.datasets import FashionMNIST

    cache = Path(cache_dir).expanduser()
    if not download:
        _stage_idx_files(Path(root), cache / "FashionMNIST" / "raw")
    train = FashionMNIST(str(cache), train=True, download=download)
    test = FashionMNIST(str(cache), train=False, download=download)
    return ImageData(train.data, train.targets, test.data, test.targets)


def _stage_idx_files(source: Path, raw_dir: Path) -> None:
    """Put uncompressed IDX files where torchvision looks; atomic, since workers race here."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name in _FASHION_FILES:
        target = raw_dir / name
        if target.exists():
            continue
        plain, packed = source / name, source / f"{name}.gz"
        if not plain.exists() and not packed.exists():
            raise FileNotFoundError(f"data.root: neither {plain} nor {packed} exists")
        fd, tmp = tempfile.mkstemp(dir=raw_dir)
        with os.fdopen(fd, "wb") as out, (gzip.open(packed) if not plain.exists() else open(plain, "rb")) as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp, target)


def digits(root: str = "", cache_dir: str = "", download: bool = False) -> ImageData:
    """sklearn's 8x8 digits (tiny, for tests): the arguments are unused, it ships inside scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # only the tests use it
        raise ImportError("data.name=digits needs scikit-learn (pip install scikit-learn)") from e
    digits = load_digits()
    images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:297], order[297:]
    return ImageData(images[train], labels[train], images[test], labels[test])


# the built-in image datasets (`data.name`): (root, cache_dir, download) -> ImageData
IMAGE_DATASETS = {"fashion_mnist": fashion_mnist, "digits": digits}


def to_float(images: Tensor) -> Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float (N, C, H, W) in [0, 1]: the encoder's input
    without augmentation (grayscale gains its channel dimension)."""
    return (images.unsqueeze(1) if images.dim() == 3 else images).float().div_(255)


def two_view_transform(size: int, crop_scale_min: float, jitter: float, blur: float = 0.0) -> v2.Compose:
    """SimCLR's views for grayscale, per image: crop + flip, optional Gaussian blur (sigma in
    [0.1, blur], half of the views), and brightness/contrast jitter so that two views cannot be
    matched by their intensity histogram alone. The batched pipeline draws the same.
    (torchvision is imported here: a worker on the batched pipeline never needs it.)"""
    from torchvision.transforms import v2

    blurring = [v2.RandomApply([v2.GaussianBlur(2 * math.ceil(2 * blur) + 1, sigma=(0.1, blur))], p=0.5)] if blur else []
    return v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *blurring,
            v2.RandomApply([v2.ColorJitter(brightness=jitter, contrast=jitter)], p=0.8),
        ]
    )


class TwoViews(Dataset):
    """Item i: {"a": view_a, "b": view_b, "labels": label} of image i, each view (C, H, W) float."""

    def __init__(self, images: Tensor, labels: Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        image = image.unsqueeze(0) if image.dim() == 2 else image  # grayscale gains its channel
        return {"a": self.transform(image), "b": self.transform(image), "labels": self.labels[i]}
