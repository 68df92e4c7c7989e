"""Several sources of training rows in one run (`dataset.sources`), as FlagEmbedding's
`same_dataset_within_batch` and sentence-transformers' multi-dataset samplers train: each global
batch comes from one source, so its in-batch negatives are of one kind (a question is not scored
against another source's duplicates of its answer).

    dataset:
      sources:
        - {name: qa, format: jsonl, path: qa.jsonl, columns: {a: question, b: answer}, weight: 3}
        - {name: nli, format: huggingface, path: data/all-nli, columns: {a: anchor, b: positive}}

Every source is a whole `dataset` section of its own (format, path, columns, held-out split,
caching or streaming), plus `name` (default: the file's name) and `weight` (default 1). Step s's
source is drawn by weight from a generator seeded by (train.seed, s): the same on every rank, and
after a resume. Each source walks through its own epochs and restarts when it runs out; an
epoch of the run is as many steps as the sources' epochs have batches together.
"""

from __future__ import annotations

import os
import re
from typing import Annotated

import numpy as np
from pydantic import Field, model_validator

from distributed_cl.data.formats import FORMATS, DatasetOptions
from distributed_cl.options import Options, field_error, tagged_union

ONE_SOURCE = tagged_union(FORMATS, "format", "imagefolder")


class SourcesOptions(Options):
    """`dataset.sources`: a list of dataset sections, each with a `weight` and a `name`."""

    sources: Annotated[list[ONE_SOURCE], Field(min_length=1)]

    @model_validator(mode="after")
    def _named(self) -> SourcesOptions:
        names = [s.name or default_name(s.path, i) for i, s in enumerate(self.sources)]
        for i, name in enumerate(names):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise field_error("sources", f"source {i}: name {name!r} must be letters, digits, '_', '-' or '.' "
                                  "(it prefixes the source's metric keys)")
            if names.index(name) != i:
                raise field_error("sources", f"two sources are named {name!r}: give each a distinct `name`")
        self.sources = [s.model_copy(update={"name": name}) for s, name in zip(self.sources, names)]
        for rule in ("labelled", "pair_labelled"):  # what the loss and the sampler read is one for the run
            kinds = {getattr(s, rule) for s in self.sources}
            if len(kinds) > 1:
                column = "label" if rule == "labelled" else "is_same"
                raise field_error("sources", f"some sources have columns.{column} and some do not: every source "
                                  "of a run must have it, or none")
        return self

    @property
    def weights(self) -> np.ndarray:
        return np.asarray([s.weight for s in self.sources], dtype=np.float64)

    def absolute_paths(self) -> SourcesOptions:
        return self.model_copy(update={"sources": [s.absolute_paths() for s in self.sources]})


def default_name(path: str, index: int) -> str:
    """A source's name from its path: the file or directory name without its extension."""
    stem = os.path.basename(path.rstrip("/")).split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).strip("_.-")
    return stem or f"source{index}"


def source_of_step(weights: np.ndarray, seed: int, step: int) -> int:
    """The source of step `step` (0-based): drawn by weight, from (seed, step) alone, so every rank
    and every resume draws the same."""
    rng = np.random.default_rng([seed, step, 0x5EED])
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def sources_of(dataset: DatasetOptions | SourcesOptions | None) -> list[DatasetOptions]:
    """The training data's sources: the list, or the one section (none: the task's built-in data)."""
    if dataset is None:
        return []
    return list(dataset.sources) if isinstance(dataset, SourcesOptions) else [dataset]
