"""DistributedMPerClassSampler: every global batch holds m samples of each of B/m classes.

The plan for an epoch is a pure function of (labels, m, global_batch_size, num_replicas, seed,
epoch), so every rank computes the same global batches independently and takes its slice:
no communication, and every rank yields the same number of batches.

Epoch rule: each class's indices are shuffled and cut into groups of m (a short last group is
topped up with other samples of its class); there are G = sum_c ceil(n_c / m) groups and an
epoch has max(1, G // C) batches of C = global_batch_size / m classes. Each batch takes the C
classes with the most groups left (random tie-breaks), one group each, so balanced data is
covered once per epoch up to fewer than C groups; a class that runs out before the epoch ends
(heavily imbalanced data, or fewer groups than batches need) is refilled from a fresh shuffle.
Each global batch is shuffled before it is split into num_replicas equal slices, so every rank
sees a mix of classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["DistributedMPerClassSampler", "DistributedRandomBatchSampler", "labels_from_pairs"]


def _default_replicas_and_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    try:
        import ray.train

        context = ray.train.get_context()
        return context.get_world_size(), context.get_world_rank()
    except (ImportError, RuntimeError):  # not inside a Ray Train worker
        return 1, 0


def _as_label_array(labels) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch.Tensor
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if len(labels) == 0:
        raise ValueError("labels is empty")
    if labels.dtype.kind not in "iuUSO":
        raise ValueError(f"labels must be integers or strings, got dtype {labels.dtype}")
    return labels


class DistributedMPerClassSampler:
    """Batch sampler: iterating yields this rank's list of dataset indices for each step.

    Args:
        labels: one label per dataset index (list, numpy array or tensor of ints or strings;
            a dataset's `targets` works).
        m: samples per class in each global batch (>= 2, so every sample has a positive).
        global_batch_size: indices per step summed over ranks; divisible by m and num_replicas.
        num_replicas, rank: default to torch.distributed's, else Ray Train's context, else 1, 0.
        seed: with the epoch (see `set_epoch`), the only source of randomness.
        ignore_label: samples with this label are never drawn (e.g. -1 from `labels_from_pairs`).

    Use with `DataLoader(dataset, batch_sampler=sampler)`. Under Ray Train, pass the loader to
    `ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)`: the default rebuilds
    loaders that have a batch_sampler and silently drops this one.
    """

    def __init__(
        self,
        labels,
        m: int,
        global_batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        ignore_label=None,
    ) -> None:
        if num_replicas is None or rank is None:
            default_replicas, default_rank = _default_replicas_and_rank()
            num_replicas = default_replicas if num_replicas is None else num_replicas
            rank = default_rank if rank is None else rank
        labels = _as_label_array(labels)
        if m < 2:
            raise ValueError(f"m must be >= 2 so that every sample has a positive, got m={m}")
        if global_batch_size <= 0 or global_batch_size % m:
            raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of m={m}")
        if num_replicas < 1 or global_batch_size % num_replicas:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by num_replicas={num_replicas}"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is outside [0, num_replicas={num_replicas})")
        keep = np.ones(len(labels), dtype=bool) if ignore_label is None else labels != ignore_label
        if not keep.any():
            raise ValueError("every label equals ignore_label")
        classes, inverse = np.unique(labels[keep], return_inverse=True)
        indices = np.flatnonzero(keep)
        self.classes_per_batch = global_batch_size // m
        if self.classes_per_batch > len(classes):
            raise ValueError(
                f"global_batch_size={global_batch_size} with m={m} needs {self.classes_per_batch} classes per "
                f"batch, but the labels have only {len(classes)} classes with data"
            )
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        self._class_indices = np.split(indices[order], bounds)
        self.classes = classes
        self.m, self.global_batch_size = m, global_batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start_batch = 0, 0
        small = [str(c) for c, idx in zip(classes, self._class_indices) if len(idx) < m]
        if small:
            warnings.warn(
                f"{len(small)} classes have fewer than m={m} samples (e.g. {', '.join(small[:5])}); "
                "they are sampled with replacement, so their batches repeat indices",
                RuntimeWarning,
                stacklevel=2,
            )
        groups = sum(-(-len(idx) // m) for idx in self._class_indices)
        self._num_batches = max(1, groups // self.classes_per_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch's plan; call it at the start of every epoch, on every rank.
        `start_batch` skips the epoch's first batches (resuming mid-epoch from a checkpoint)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self._num_batches

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.num_replicas

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (each of global_batch_size indices), identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = [self._class_groups(c, rng) for c in range(len(self._class_indices))]
        batches = []
        for _ in range(self._num_batches):
            remaining = np.array([len(q) for q in queues], dtype=np.float64)
            priority = remaining + rng.random(len(queues))  # most groups left first, random ties
            chosen = np.argpartition(-priority, self.classes_per_batch - 1)[: self.classes_per_batch]
            for c in chosen:
                if not queues[c]:  # ran out before the epoch ended: refill from a fresh shuffle
                    queues[c] = self._class_groups(c, rng)
            batch = np.concatenate([queues[c].pop() for c in chosen])
            batches.append(rng.permutation(batch))
        return batches

    def _class_groups(self, c: int, rng: np.random.Generator) -> list[np.ndarray]:
        idx = self._class_indices[c]
        m = self.m
        if len(idx) < m:
            return [rng.choice(idx, size=m, replace=True)]
        shuffled = rng.permutation(idx)
        groups = [shuffled[i : i + m] for i in range(0, len(shuffled) - m + 1, m)]
        short = len(shuffled) % m
        if short:  # top up with other samples of the class, never one already in the group
            tail = shuffled[-short:]
            filler = rng.choice(shuffled[:-short], size=m - short, replace=False)
            groups.append(np.concatenate([tail, filler]))
        rng.shuffle(groups)
        return groups

    def __iter__(self) -> Iterator[list[int]]:
        start = self.rank * self.local_batch_size
        for batch in self.global_batches()[self.start_batch :]:
            yield batch[start : start + self.local_batch_size].tolist()


class DistributedRandomBatchSampler:
    """Batch sampler for losses that need no labels: each epoch is a seeded permutation of the
    dataset cut into global batches (the last partial one dropped) and split evenly over ranks.
    Same interface and determinism rules as DistributedMPerClassSampler."""

    def __init__(self, num_samples: int, global_batch_size: int, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0) -> None:
        if num_replicas is None or rank is None:
            default_replicas, default_rank = _default_replicas_and_rank()
            num_replicas = default_replicas if num_replicas is None else num_replicas
            rank = default_rank if rank is None else rank
        if global_batch_size <= 0 or global_batch_size % num_replicas:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by num_replicas={num_replicas}")
        if num_samples < global_batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch_size}")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.local_batch_size = global_batch_size // num_replicas
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        start = self.rank * self.local_batch_size
        for b in range(self.start_batch, len(self)):
            batch = order[b * self.global_batch_size : (b + 1) * self.global_batch_size]
            yield batch[start : start + self.local_batch_size].tolist()


def labels_from_pairs(num_samples: int, positive_pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Labels for pair-annotated data: samples linked by positive pairs share a label (connected
    components), samples in no pair get -1. With `ignore_label=-1` and m=2, every group the
    sampler draws is a positive pair (components of two), so each global batch holds both members
    of its pairs; larger components give groups of m members of the same component."""
    parent = np.arange(num_samples)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    paired = np.zeros(num_samples, dtype=bool)
    for a, b in positive_pairs:
        if not (0 <= a < num_samples and 0 <= b < num_samples):
            raise ValueError(f"pair ({a}, {b}) is outside [0, {num_samples})")
        if a == b:
            raise ValueError(f"pair ({a}, {b}) links a sample to itself")
        parent[find(a)] = find(b)
        paired[a] = paired[b] = True
    roots = np.array([find(i) for i in range(num_samples)])
    _, labels = np.unique(roots, return_inverse=True)
    return np.where(paired, labels, -1)
