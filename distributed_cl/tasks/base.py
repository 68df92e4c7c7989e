"""What a task is: the contract between a modality and the generic training loop.

A task is a modality: how a batch of decoded rows becomes the towers' input (`collate` on the
CPU, `augment` on the device), the towers, and the held-out evaluation. The data is not the
task's: any source that yields `Splits` of decoded `Table`s (a task's built-in dataset, or your
own files in a standard format, held in memory or streamed) plugs into it. The towers map a
batch's two sides to paired embeddings (z_a[i], z_b[i]): two views of an image, a text pair, an
image and its caption. The loop (train_loop.py) owns everything shared: workers, DDP, the loss
call, optimizer and schedule, checkpoints, progress and reports.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distributed_cl.data.beir import Beir, load_beir
from distributed_cl.data.formats import FORMATS, load_dataset_splits
from distributed_cl.data.table import Splits, Table
from distributed_cl.evaluate import sharded_embed
from distributed_cl.model_card import Export
from distributed_cl.models.lora import without_adapters
from distributed_cl.options import Options
from distributed_cl.retrieval import BEIR_METRICS, RANKED, TopK, id_order, ir_metrics

if TYPE_CHECKING:
    from distributed_cl.losses import LossStats

TOWERS_FILE = "towers.pt"

# The composed run configuration (config.py, which imports the tasks): a task reads its own
# sections, `dataset`, `train` and `loss` of it.
Config = Any

TOWERS_SNIPPET = """from distributed_cl.tasks import load_towers

towers = load_towers("{path}/towers.pt")  # the towers, eval mode, from the file alone"""


class Task(ABC):
    """Built in every worker with its rank and world size (evaluation is sharded across them)."""

    name: str
    sections: ClassVar[dict[str, type[Options]]]  # the config sections it owns: its built-in data and towers
    baseline_name: str = "baseline"
    summary_files: ClassVar[dict[str, str]] = {}  # output JSON keys of export files, e.g. {"encoder": "encoder.pt"}  # `baselines()` keys are f"{metric}_{baseline_name}"
    sides: tuple[str, str | None]  # what sides a and b hold: "image", "text" or None (both views from a)
    builtin_data: str = ""  # the name of the task's built-in dataset (model cards)

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 data: Splits | None = None) -> None:
        self.config, self.rank, self.world, self.device = config, rank, world, torch.device(device)
        self.data = type(self).load_data(config) if data is None else data  # outside the trainer: loaded here

    @classmethod
    def load_data(cls, config: Config) -> Splits:
        """The config's data: its `dataset` section (decoded into memory, or set up to stream), else
        the task's built-in dataset. The data comes by side; `collate` maps the sides to the towers."""
        if config.dataset is None:
            return cls.builtin(config)
        splits = load_dataset_splits(config.dataset, cls.sides, config.train.seed, config.train.verbose)
        x = config.dataset
        if x.eval_beir is not None:  # small enough to hold: a large corpus is `train.py evaluate`'s
            splits.beir = load_beir(x.eval_beir, x.eval_beir_split, "dataset.eval_beir").with_corpus(x.image_size)
        return splits

    @classmethod
    @abstractmethod
    def check_files(cls, config: Config) -> None:
        """Before Ray starts: the built-in data's files (without a `dataset`), model directories and
        weights the towers read. Raises FileNotFoundError or ValueError naming the field."""

    @classmethod
    def saved_config(cls, raw: dict) -> Any:
        """What `build_towers` and `saved_tokenizer` read of a saved config (towers.pt): the task's
        own sections and `dataset`, without the config of the run that saved it."""
        dataset = raw.get("dataset")
        sections = {name: options.model_validate(raw[name]) for name, options in cls.sections.items()}
        return SimpleNamespace(task=cls.name, dataset=dataset and FORMATS[dataset["format"]].model_validate(dataset),
                               **sections)

    @staticmethod
    @abstractmethod
    def builtin(config: Config) -> Splits:
        """The task's built-in dataset (used when the config has no `dataset` section)."""

    builtin_labelled: bool = False  # whether the built-in rows have class labels

    @classmethod
    def labelled(cls, config: Config) -> bool:
        """Whether the config's rows have class labels: the built-in data's own, an imagefolder's
        folder names, or a `dataset.columns.label` column."""
        return cls.builtin_labelled if config.dataset is None else config.datasets[0].labelled  # every source alike

    @classmethod
    @abstractmethod
    def metric_names(cls, config: Config) -> tuple[str, ...]:
        """What `evaluate` returns for this config's data, e.g. ("knn_top1",)."""

    @abstractmethod
    def collate(self, rows: Table) -> dict:
        """A batch {"a", "b", "labels"} of the towers' CPU-side inputs (tokens; images stay uint8)
        from decoded rows. Deterministic: it may run in loader processes. A side that is None in
        `rows` (images held on the device) is filled in later by the caller."""

    def augment(self, batch: dict) -> dict:
        """Random views, on the device, of a collated batch (the RNG is seeded per rank and checkpointed)."""
        return batch

    @staticmethod
    @abstractmethod
    def build_towers(config: Config, architecture: dict | None = None) -> nn.Module:
        """The trainable model: `towers(a, b) -> (z_a, z_b)`, with `towers.lr_mults()` (parameters
        and their learning-rate multipliers) and `towers.architecture()`. Depends on the config
        only, so the same seed rebuilds the same untrained (or pretrained) towers, the comparison at
        the end. With `architecture` (what `towers.architecture()` returned), no pretrained weights
        or files are read: a saved state dict fills the towers (export loading)."""

    @classmethod
    def side_for(cls, kind: str, prefer: str) -> str:
        """The towers' side ("a" or "b") that embeds `kind` ("text", "image"), `prefer` where both do."""
        kinds = {"a": cls.sides[0], "b": cls.sides[1] or cls.sides[0]}  # the image task: both sides are views
        for side in (prefer, "b" if prefer == "a" else "a"):
            if kinds[side] == kind:
                return side
        raise ValueError(f"the {cls.name} towers embed {' and '.join(sorted(set(kinds.values())))}, not {kind}")

    @classmethod
    def unshardable(cls, config: Config) -> str | None:
        """Why train.strategy=fsdp cannot shard this config's towers (too small: no repeated
        transformer blocks), or None. The workers check the towers themselves too."""
        return None

    @classmethod
    def check_benchmark(cls, config: Config) -> None:
        """Before Ray starts: the judgements of dataset.eval_beir name only its queries and documents,
        and these towers embed its corpus."""
        x = config.dataset
        if x is not None and x.eval_beir is not None:
            beir = load_beir(x.eval_beir, x.eval_beir_split, "dataset.eval_beir")
            cls.side_for(beir.corpus_kind, "b")

    @classmethod
    def all_metric_names(cls, config: Config) -> tuple[str, ...]:
        """`metric_names`, and the BEIR figures where the data names a benchmark (dataset.eval_beir);
        with several sources, each source's, prefixed by its name (`<name>_recall@1`)."""
        configs = config.source_configs()
        if len(configs) > 1 or configs[0] is not config:
            return tuple(f"{c.dataset.name}_{name}" for c in configs for name in cls.all_metric_names(c))
        beir = config.dataset is not None and config.dataset.eval_beir is not None
        return cls.metric_names(config) + (tuple(f"beir_{name}" for name in BEIR_METRICS) if beir else ())

    def evaluate_all(self, towers: nn.Module) -> dict[str, float]:
        """`evaluate`'s metrics, and the BEIR figures of the benchmark the data names."""
        metrics = self.evaluate(towers)
        if self.data.beir is not None:
            metrics |= {f"beir_{name}": value for name, value in self.beir_metrics(towers, self.data.beir).items()}
        return metrics

    def beir_metrics(self, towers: nn.Module, beir: Beir) -> dict[str, float]:
        """nDCG@10, MRR@10, Recall@10/100, MAP@100 of a benchmark held in memory: queries and
        corpus embedded sharded over the ranks, the search exact (every rank the same)."""
        tokenize = getattr(self, "tokenize", None)

        def embed(side: str, values) -> Tensor:
            return sharded_embed(lambda chunk: self.encode(towers, side, chunk, tokenize, self.device), values,
                                 self.rank, self.world, self.device)

        queries = embed(self.side_for("text", "a"), beir.queries)
        corpus = embed(self.side_for(beir.corpus_kind, "b"), beir.corpus)
        top = TopK(queries, RANKED)
        top.add(corpus, 0, id_order(beir.corpus_ids))  # equal scores rank by corpus id, as the evaluator's
        return ir_metrics(top.result()[1], beir.relevant)

    @classmethod
    def tokenizer(cls, config: Config) -> Callable[[list[str]], dict] | None:
        """The towers' text tokenizer (None: no text side)."""
        return None

    @staticmethod
    @abstractmethod
    def encode(towers: nn.Module, side: str, values, tokenize: Callable | None, device: torch.device) -> Tensor:
        """The embeddings of one side's decoded values (side "a" or "b": a list of texts, or uint8
        images), as the held-out evaluation and the exports see them: what `train.py embed`,
        `evaluate` and `mine` compute."""

    @abstractmethod
    def evaluate(self, towers: nn.Module) -> dict[str, float]:
        """Metrics on the held-out split, keyed by `metric_names`. Runs on every rank together
        (each embeds a shard); towers are in eval mode, autograd off."""

    def train_batches(self, batch_sampler: Iterable[list[int]]) -> Iterable[dict]:
        """Augmented batches on the device for the sampler's indices into `data.train`."""
        return CachedBatches(self, self.data.train, batch_sampler)

    def baselines(self) -> dict[str, float]:
        """Reference figures that need no model (raw pixels, chance), as final output keys."""
        return {}

    def export(self, towers: nn.Module, directory: str) -> None:
        """Files a user loads without Ray. The generic one, which `load_towers` reads, is whole:
        the towers' architecture and weights, and the tokenizer's files where there is text."""
        saved = {"task": self.name, "config": without_adapters(self.config.to_dict()),  # (merged towers: no adapters)
                 "architecture": towers.architecture(),
                 "state_dict": towers.state_dict(), "tokenizer": self.tokenizer_state()}
        torch.save(saved, os.path.join(directory, TOWERS_FILE))

    @torch.no_grad()
    def report_view(self, towers: nn.Module, points: int = 400, queries: int = 6, seed: int = 0) -> dict:
        """What the run report shows of the held-out split (rank 0 alone; small): its first
        `points` rows' side-a embeddings in 2-D (PCA) with their labels, and for `queries` of them
        (seeded) the top 5 side-b results (side a's other rows where there is no side b), a result
        right when it is the query's own pair, or for a self-search one of its class."""
        test, tokenize = self.data.test, getattr(self, "tokenize", None)
        n = min(points, len(test))
        if n < 2:
            return {}
        za = F.normalize(self.encode(towers, "a", test.a[:n], tokenize, self.device).float(), dim=-1).cpu()
        pairs = self.sides[1] is not None and test.b is not None
        zb = F.normalize(self.encode(towers, "b", test.b[:n], tokenize, self.device).float(), dim=-1).cpu() if pairs else za
        centred = za - za.mean(0)
        xy = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T
        labels = test.labels[:n].tolist() if test.labelled else None
        chosen = np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False)
        examples = []
        for q in chosen.tolist():
            scores = zb @ za[q]
            if not pairs:
                scores[q] = -float("inf")  # not itself
            top = scores.topk(min(5, n - (not pairs)))
            results = [{**self.view_cell(test.b if pairs else test.a, i), "row": i, "score": float(v),
                        "right": i == q if pairs else (labels is not None and labels[i] == labels[q])}
                       for v, i in zip(top.values.tolist(), top.indices.tolist())]
            examples.append({"query": {**self.view_cell(test.a, q), "row": q}, "results": results})
        kind = self.sides[1] if pairs else self.sides[0]
        return {"map": {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "label": labels, "method": "PCA",
                        "label_names": {str(k): v for k, v in (test.label_names or {}).items()}},
                "examples": examples, "candidates": n, "result_side": f"{kind}s"}

    @staticmethod
    def view_cell(values, i: int) -> dict:
        """Row `i` of a side, as the report shows it: its text, or its image as a base64 PNG."""
        value = values[i]
        if isinstance(value, str):
            return {"text": value if len(value) <= 300 else value[:297] + "..."}
        import base64
        import io

        from PIL import Image

        pixels = value.cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        if pixels.dtype != np.uint8:  # floats in [0, 1]
            pixels = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
        pixels = pixels.transpose(1, 2, 0) if pixels.ndim == 3 else pixels  # CHW -> HWC
        image = Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)
        image.thumbnail((96, 96))  # a report's worth of them stays small
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"png": base64.b64encode(buffer.getvalue()).decode()}

    def exports(self, towers: nn.Module) -> list[Export]:
        """What the export directory holds for a model card to describe (a README.md in each; one
        at the top, the most specific)."""
        return [Export("", "pytorch", "feature-extraction", TOWERS_SNIPPET, "towers.pt")]

    @property
    def base_model(self) -> str | None:
        """The pretrained weights the towers start from (a Hub name or a path), or None."""
        return None

    @property
    def adapter_base(self) -> str | None:
        """The lines of the adapter's card snippet that load the model its LoRA adapter goes on, as
        `base`; None: transformers' AutoModel from the base model the adapter names."""
        return None

    def tokenizer_state(self) -> dict | None:
        """The text tokenizer as towers.pt keeps it (its files), or None (no text, or no files)."""
        tokenize = getattr(self, "tokenize", None)
        return tokenize.files() if hasattr(tokenize, "files") else None

    @staticmethod
    def saved_tokenizer(config: Config, state: dict | None) -> Callable[[list[str]], dict] | None:
        """The tokenizer `tokenizer_state` saved (load_towers attaches it to the towers)."""
        if state is None:
            return None
        from distributed_cl.models import TextTokenizer

        return TextTokenizer.from_files(state)

    @property
    def loader_workers(self) -> int:
        workers = self.config.train.loader_workers
        return (2 if self.device.type == "cuda" else 0) if workers is None else workers


def pair_extras(rows: Table, encode_b: Callable[[list], dict]) -> dict:
    """What a batch carries beyond its two sides, where the data has it: the rows' h hard negatives
    (texts encoded as side b is, in one call, each tensor shaped (n, h, ...): dim 0 stays the rows,
    so that gradient caching's chunks of rows take their rows' negatives) and their 0/1 pair labels."""
    extras = {}
    if rows.negative is not None:
        h = len(rows.negative[0]) if len(rows) else 1
        extras["negative"] = _by_row(encode_b([text for row in rows.negative for text in row]), len(rows), h)
    if rows.is_same is not None:
        extras["is_same"] = rows.is_same
    return extras


def _by_row(x, n: int, h: int):
    """Tensors (in a dict) of n * h leading rows as (n, h, ...)."""
    return x.unflatten(0, (n, h)) if isinstance(x, Tensor) else {key: _by_row(v, n, h) for key, v in x.items()}


def _flat_rows(x):
    """Tensors (in a dict) of leading shape (n, h) as (n * h, ...)."""
    return x.flatten(0, 1) if isinstance(x, Tensor) else {key: _flat_rows(v) for key, v in x.items()}


def _negative_shape(x) -> tuple[int, int]:
    return tuple(x.shape[:2]) if isinstance(x, Tensor) else _negative_shape(next(iter(x.values())))


class CachedBatches:
    """A table in memory served for a batch sampler. Image columns live on the device (a few
    hundred MB as uint8 at most: the cache limit) and are gathered there by the batch's indices;
    the rest is collated on the CPU (tokenising) by the task, in `train.loader_workers` processes
    that prefetch while the step runs, into pinned memory when training on CUDA. Then the task
    augments the whole batch at once on the device."""

    def __init__(self, task: Task, table: Table, batch_sampler: Iterable[list[int]]) -> None:
        self.task, self.device = task, task.device
        self.resident = {side: getattr(table, side).to(self.device) for side in ("a", "b")
                         if isinstance(getattr(table, side), Tensor)}
        host = replace(table, **dict.fromkeys(self.resident))
        workers = task.loader_workers
        self.loader = DataLoader(range(len(table)), batch_sampler=batch_sampler,
                                 collate_fn=_Collate(task.collate, host), num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=2 if workers else None,
                                 generator=torch.Generator())  # keeps the global RNG untouched by iterators

    def __iter__(self):
        for batch in self.loader:
            index = batch.pop("index").to(self.device, non_blocking=True)  # no wait for the GPU
            batch = to_device(batch, self.device)
            batch |= {side: column[index] for side, column in self.resident.items()}
            yield self.task.augment(batch)


class _Collate:
    """Picklable `indices -> collated batch` for loader processes."""

    def __init__(self, collate: Callable[[Table], dict], table: Table) -> None:
        self.collate, self.table = collate, table

    def __call__(self, indices: list[int]) -> dict:
        return {**self.collate(self.table.take(indices)), "index": torch.as_tensor(indices)}


class ContrastiveModel(nn.Module):
    """Towers + loss in one module, so that DDP (and the optimizer) cover the loss's own
    parameters, such as CLIP's logit_scale. A pretrained CLIP's own `logit_scale` (and a SigLIP's
    `logit_bias`) becomes the loss's: training starts from the value it learnt, goes on learning
    it, and exports it."""

    def __init__(self, towers: nn.Module, loss_fn: nn.Module, objective) -> None:
        super().__init__()
        if getattr(towers, "logit_bias", None) is not None and not hasattr(loss_fn, "logit_bias"):
            raise ValueError(f"the pretrained towers are a SigLIP (a logit bias beside the scale): train them with "
                             f"loss.name: siglip, not {type(loss_fn).__name__}")
        for name in ("logit_scale", "logit_bias"):
            pretrained = getattr(towers, name, None)
            if pretrained is None:
                continue
            if isinstance(getattr(loss_fn, name, None), nn.Parameter):
                setattr(loss_fn, name, pretrained)  # one parameter, in both modules
            else:  # a loss of fixed temperature: unused, and DDP must not wait for its gradient
                pretrained.requires_grad_(False)
        self.towers, self.loss_fn, self.objective = towers, loss_fn, objective
        self.step_keys: tuple[Tensor, Tensor] | None = None  # the last loss's embeddings, detached (the queue's keys)

    def embed(self, batch: dict) -> tuple[Tensor, ...]:
        """(z_a, z_b), and where the batch has them the rows' h hard negatives' embeddings (n, h, d),
        from side b's tower (`batch["negative"]`: side b's input of leading shape (n, h))."""
        z_a, z_b = self.towers(batch["a"], batch["b"])
        if "negative" not in batch:
            return z_a, z_b
        n, h = _negative_shape(batch["negative"])
        return z_a, z_b, self.towers.embed_b(_flat_rows(batch["negative"])).unflatten(0, (n, h))

    def forward(self, batch: dict, embed_only: bool = False) -> tuple[Tensor, LossStats] | tuple[Tensor, ...]:
        """The loss and its statistics (`loss`), or with `embed_only` the embeddings."""
        embeddings = self.embed(batch)
        if embed_only:  # gradient caching's second pass (grad_cache.py)
            # The loss's parameters took their gradient from the cached loss; a zero use here puts
            # them in this backward, so that DDP averages them with the towers' gradients.
            z_a, *rest = embeddings
            return z_a + sum((p.flatten()[0] * 0 for p in self.loss_fn.parameters() if p.requires_grad), 0.0), *rest
        return self.loss(embeddings, batch)

    def loss(self, embeddings: tuple[Tensor, ...], batch: dict) -> tuple[Tensor, LossStats]:
        """The objective on a batch's embeddings (`embed`'s), and the loss's statistics of the
        global batch; `batch["memory"]`, if any, holds past keys (the queue), `batch["is_same"]`
        the rows' pair labels."""
        z_a, z_b, *negative = embeddings
        self.step_keys = (z_a.detach(), z_b.detach())
        loss_fn = functools.partial(self.loss_fn, return_stats=True)  # the objective returns what the loss does
        return self.objective(loss_fn, z_a, z_b, batch["labels"], batch.get("memory"),
                              negative[0] if negative else None, batch.get("is_same"))


def to_device(batch, device: torch.device):
    """Tensors in nested dicts/lists/tuples to `device` (pinned CPU memory copies asynchronously)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
