"""What a task is: the contract between a modality and the generic training loop.

A task owns its data (training batches, the sampler's labels, a held-out split), builds its
towers, and evaluates them. The towers map a batch's two sides to paired embeddings
(z_a[i], z_b[i]): two views of an image, a definition and its example, an image and its caption.
The loop (train_loop.py) owns everything shared: workers, DDP, the loss call, optimizer and
schedule, checkpoints, progress and reports. A new task is one new module here plus its config
section.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distributed_cl.config import Config, LossConfig
from distributed_cl.losses import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss

TOWERS_FILE = "towers.pt"


class Task(ABC):
    """Built in every worker with its rank and world size (evaluation is sharded across them)."""

    name: str
    metric_names: tuple[str, ...]  # what `evaluate` returns, e.g. ("knn_top1",)
    baseline_name: str = "baseline"  # `baselines()` keys are f"{metric}_{baseline_name}"

    def __init__(self, config: Config, rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> None:
        self.config, self.rank, self.world, self.device = config, rank, world, torch.device(device)

    @property
    @abstractmethod
    def train_labels(self) -> Tensor:
        """One class id per training item: the M-per-class sampler draws batches from these."""

    @abstractmethod
    def train_batches(self, batch_sampler: Iterable[list[int]]) -> Iterable[dict]:
        """Batches {"a": ..., "b": ..., "labels": (n,) int64} for the sampler's indices, on the CPU (see
        `loader`) or made on the device already (the loop moves whatever is not there)."""

    @staticmethod
    @abstractmethod
    def build_towers(config: Config) -> nn.Module:
        """The trainable model: `towers(a, b) -> (z_a, z_b)`. Depends on the config only, so the
        same seed rebuilds the same untrained towers (the comparison at the end, export loading)."""

    @abstractmethod
    def evaluate(self, towers: nn.Module) -> dict[str, float]:
        """Metrics on the held-out split, keyed by `metric_names`. Runs on every rank together
        (each embeds a shard); towers are in eval mode, autograd off."""

    def loader(self, batch_sampler: Iterable[list[int]], collate: Callable[[list[int]], dict]) -> DataLoader:
        """Batches made on the CPU (tokenising, decoding) by `collate(indices)`, in
        `train.loader_workers` processes that prefetch while the step runs, into pinned memory when
        training on CUDA. `collate` must be deterministic: random augmentation belongs in the main
        process, whose RNG is seeded per rank and checkpointed."""
        workers = self.config.train.loader_workers
        if workers is None:
            workers = 2 if self.device.type == "cuda" else 0
        indices = range(len(self.train_labels))  # items are the indices themselves
        return DataLoader(indices, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                          prefetch_factor=2 if workers else None,
                          generator=torch.Generator())  # keeps the global RNG untouched by iterators

    def baselines(self) -> dict[str, float]:
        """Reference figures that need no model (raw pixels, chance), as final output keys."""
        return {}

    def export(self, towers: nn.Module, directory: str) -> None:
        """Files a user loads without Ray; `load_towers` reads the generic one."""
        torch.save({"task": self.name, "config": self.config.to_dict(), "state_dict": towers.state_dict()},
                   os.path.join(directory, TOWERS_FILE))


# ----------------------------------------------------------------------------- shared pieces


def _pair_views(loss_fn, z_a, z_b, labels):
    return loss_fn(z_a, z_b)


def _supervised_views(loss_fn, z_a, z_b, labels):
    return loss_fn(torch.cat([z_a, z_b]), torch.cat([labels, labels]))


def build_objective(config: LossConfig):
    """The loss module and how it consumes paired embeddings and labels: NT-Xent, InfoNCE and CLIP
    take (z_a, z_b) as positives; SupCon sees both sides as one labelled set."""
    losses = {"ntxent": NTXentLoss, "infonce": InfoNCELoss, "clip": ClipLoss, "supcon": SupConLoss}
    if config.name not in losses:
        raise ValueError(f"loss.name: unknown loss {config.name!r}")
    objective = _supervised_views if config.name == "supcon" else _pair_views
    return losses[config.name](config.temperature, chunk_size=config.chunk_size), objective


class ContrastiveModel(nn.Module):
    """Towers + loss in one module, so that DDP (and the optimizer) cover the loss's own
    parameters, such as CLIP's logit_scale."""

    def __init__(self, towers: nn.Module, loss_fn: nn.Module, objective) -> None:
        super().__init__()
        self.towers, self.loss_fn, self.objective = towers, loss_fn, objective

    def forward(self, batch: dict, embed_only: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        z_a, z_b = self.towers(batch["a"], batch["b"])
        if embed_only:  # gradient caching's second pass (grad_cache.py)
            # The loss's parameters took their gradient from the cached loss; a zero use here puts
            # them in this backward, so that DDP averages them with the towers' gradients.
            return z_a + sum((p.flatten()[0] * 0 for p in self.loss_fn.parameters() if p.requires_grad), 0.0), z_b
        return self.objective(self.loss_fn, z_a, z_b, batch["labels"])


def to_device(batch, device: torch.device):
    """Tensors in nested dicts/lists/tuples to `device` (pinned CPU memory copies asynchronously)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
