"""Decoded rows, the one form every data source hands to a task: the built-in datasets, your own
files once decoded into memory, and every streamed batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

Column = Tensor | list  # images: uint8 (n, C, H, W) or (n, H, W); texts: a list of str


def take(column: Column | None, index: Tensor | Sequence[int]) -> Column | None:
    if column is None:
        return None
    if isinstance(column, Tensor):
        return column[torch.as_tensor(index, dtype=torch.long).to(column.device)]
    return [column[i] for i in (index.tolist() if isinstance(index, Tensor) else index)]


@dataclass
class Table:
    """Rows with a side `a`, an optional side `b` and an int64 class label per row; where the data
    has them, h hard negatives of side b's kind per row (`negative`) and a 0/1 `is_same` per row.

    `labelled` says whether the labels are classes a loss or kNN may use; where they are not,
    each row is its own class (labels = arange), which no loss reads as a positive."""

    a: Column | None  # None only in a copy whose images stay on the device (see CachedBatches)
    b: Column | None = None
    labels: Tensor | None = None
    labelled: bool = False
    label_names: dict[int, str] = field(default_factory=dict)  # where known: id -> the data's own name
    # texts: a tuple of h texts a row (a list of n tuples); images: uint8 (n, h, C, H, W)
    negative: Column | None = None
    is_same: Tensor | None = None

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = torch.arange(len(self.a))
        if isinstance(self.negative, list):  # a text a row is h = 1
            self.negative = [(x,) if isinstance(x, str) else tuple(x) for x in self.negative]
        for side in (self.a, self.b, self.negative, self.is_same):
            if side is not None and len(side) != len(self.labels):
                raise ValueError(f"{len(self.labels)} labels but a column of {len(side)} rows")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: Tensor | Sequence[int]) -> Table:
        return replace(self, a=take(self.a, index), b=take(self.b, index), labels=take(self.labels, index),
                       negative=take(self.negative, index), is_same=take(self.is_same, index))

    def matching(self) -> Table:
        """The rows whose sides match (is_same 1): the pairs retrieval is scored on. All rows where
        the data has no is_same."""
        return self if self.is_same is None else self.take(self.is_same.nonzero().squeeze(1))

    def head(self, n: int) -> Table:
        return self.take(range(min(n, len(self))))

    def to(self, device: torch.device | str) -> Table:
        """Image columns moved to `device` (texts stay lists)."""
        move = lambda c: c.to(device) if isinstance(c, Tensor) else c  # noqa: E731
        return replace(self, a=move(self.a), b=move(self.b), labels=self.labels.to(device), negative=move(self.negative),
                       is_same=move(self.is_same))

    def digests(self) -> list[str]:
        """A short digest of each row's content (both sides, and the negatives), to tell rows apart in logs."""
        import hashlib

        def cell(column, i) -> bytes:
            if column is None:
                return b""
            if isinstance(column, Tensor):
                return column[i].cpu().numpy().tobytes()
            value = column[i]
            return "\x1f".join(value).encode() if isinstance(value, tuple) else str(value).encode()  # h negatives

        return [hashlib.blake2b(cell(self.a, i) + b"|" + cell(self.b, i) + b"|" + cell(self.negative, i),
                                digest_size=6).hexdigest() for i in range(len(self))]

    @staticmethod
    def concat(parts: Sequence[Table]) -> Table:
        def cat(columns):
            if columns[0] is None:
                return None
            return torch.cat(columns) if isinstance(columns[0], Tensor) else [x for c in columns for x in c]

        first = parts[0]
        return replace(first, a=cat([p.a for p in parts]), b=cat([p.b for p in parts]),
                       labels=torch.cat([p.labels for p in parts]),
                       label_names={k: v for p in parts for k, v in p.label_names.items()},
                       negative=cat([p.negative for p in parts]), is_same=cat([p.is_same for p in parts]))

    @staticmethod
    def from_numpy(batch: dict[str, np.ndarray], labelled: bool) -> Table:
        """A decoded batch of a Ray Data stream (columns a, b, label, and negative, is_same where
        the data has them) as a Table; `negative` holds h texts a row (Arrow lists), or images."""

        def column(x, per_row: bool = False):  # per_row: h values a row, of Arrow lists
            if x is None:
                return None
            if x.dtype != object and x.dtype.kind != "U":
                return torch.from_numpy(np.ascontiguousarray(x))
            return [tuple(str(s) for s in row) for row in x] if per_row else [str(s) for s in x]

        labels = torch.from_numpy(batch["label"].astype(np.int64))
        names = {int(i): str(n) for i, n in zip(batch["label"], batch.get("label_name", ())) if n} if labelled else {}
        is_same = torch.from_numpy(batch["is_same"].astype(np.int64)) if "is_same" in batch else None
        return Table(column(batch["a"]), column(batch.get("b")), labels, labelled=labelled, label_names=names,
                     negative=column(batch.get("negative"), per_row=True), is_same=is_same)


@dataclass
class Splits:
    """What a data source hands a task.

    train: the training rows in memory, or None when they stream through Ray Data (each worker
        then reads its shard of the trainer's "train" dataset).
    test: held-out rows (always in memory: scored whole, never through a split that drops rows).
    bank: training rows that kNN evaluation classifies the held-out rows by (labelled data).
    skipped_rows / skipped_examples: rows that did not decode (or had an empty text) while
        decoding these splits, and a few of them (`file or key: reason`)."""

    train: Table | None
    test: Table
    bank: Table | None = None
    skipped_rows: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    train_rows: int | None = None  # the training split's size where known (streamed: estimated)
    beir: Any = None  # a retrieval benchmark scored with the held-out split (data/beir.py's Beir, its corpus loaded)

    @property
    def streamed(self) -> bool:
        return self.train is None
