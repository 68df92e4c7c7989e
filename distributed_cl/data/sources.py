"""Data sources: the built-in datasets and your own files, both handed to a task as `Splits` of
decoded `Table`s. A task names its built-in source (`Task.builtin`); a config's `dataset`
section replaces it with files in a standard format (data/formats.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distributed_cl.config import Config
from distributed_cl.data.emoji import load_emoji
from distributed_cl.data.images import load_images
from distributed_cl.data.table import Splits, Table
from distributed_cl.data.wordnet import load_wordnet

if TYPE_CHECKING:
    from distributed_cl.tasks import Task


def load_splits(config: Config, task: type[Task]) -> Splits:
    """The config's data for `task`: its `dataset` section (decoded into memory, or set up to
    stream), else the task's built-in dataset."""
    if config.dataset is None:
        return task.builtin(config)
    from distributed_cl.data.formats import load_dataset_splits

    return load_dataset_splits(config, task.sides)


def fashion_mnist(config: Config) -> Splits:
    """Fashion-MNIST (or sklearn's digits), grayscale 28x28: the image task's built-in data. The kNN
    bank is a seeded sample of the training images."""
    d = config.data
    data = load_images(d)
    train = Table(data.train_images, labels=data.train_labels, labelled=True)
    if d.train_subset:
        train = train.head(d.train_subset)
    bank = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.train.seed))
    test = Table(data.test_images, labels=data.test_labels, labelled=True)
    return Splits(train, test.head(d.eval_test_size or len(test)), bank=train.take(bank[: d.eval_bank_size or None]),
                  train_rows=len(train))


def wordnet_pairs(config: Config) -> Splits:
    """WordNet (definition, example sentence) pairs labelled by supersense: the text task's built-in data."""
    x = config.text
    data = load_wordnet(x.root, x.heldout_synsets, seed=config.train.seed, max_train_pairs=x.max_train_pairs)
    train, test = (Table(p.anchors, p.positives, p.labels, labelled=True) for p in (data.train, data.test))
    return Splits(train, test, bank=train.head(x.eval_bank_size), train_rows=len(train))


def emoji_captions(config: Config) -> Splits:
    """Emoji drawn from Noto Color Emoji with their CLDR names: the image-text task's built-in data.
    Every emoji is its own class."""
    x = config.image_text
    data = load_emoji(x.font, x.image_size, x.test_size, seed=config.train.seed, cache_dir=x.cache_dir,
                      max_train=x.max_train)
    train, test = (Table(p.images, p.captions) for p in (data.train, data.test))
    return Splits(train, test, train_rows=len(train))
