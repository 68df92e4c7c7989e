"""A queue of past keys: extra negatives for a small batch (MoCo, He et al. 2020; XBM, Wang et al. 2020).

Every rank holds the same queue: after each step the step's keys are gathered from every rank
and enqueued in rank order, so the losses score every anchor against the same candidates, and
their gradients stay the single-process ones (the keys are constants). pytorch-metric-learning's
CrossBatchMemory enqueues each rank's own keys, so its ranks drift apart under DDP.

The keys are the towers' embeddings of the step, detached (XBM), or, with `train.momentum` > 0,
those of a momentum encoder: an exponential moving average of the towers, updated after each
optimizer step, which changes slowly, so that keys enqueued steps apart stay comparable (MoCo).
The queue and the momentum encoder are saved in every checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distributed_cl import distributed as dist_utils
from distributed_cl.grad_cache import split_batch
from distributed_cl.losses.core import Memory


class KeyQueue:
    """FIFO of the last `size` keys of both sides (L2-normalised fp32) and their labels."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size, self.filled, self.next = size, 0, 0
        self.a = self.b = self.labels = None

    def memory(self) -> Memory | None:
        if not self.filled:
            return None
        return Memory(self.a[: self.filled], self.b[: self.filled], self.labels[: self.filled])

    @torch.no_grad()
    def push(self, z_a: Tensor, z_b: Tensor, labels: Tensor) -> None:
        """Enqueue this rank's keys with every other rank's, in rank order (a collective: every rank calls it)."""
        sizes = dist_utils.all_gather_sizes(len(z_a), z_a.device)
        keys = [dist_utils.all_gather_no_grad(F.normalize(z.float(), dim=1), sizes) for z in (z_a, z_b)]
        labels = dist_utils.all_gather_no_grad(labels.to(z_a.device).long(), sizes)
        if self.a is None:
            dim, device = keys[0].shape[1], keys[0].device
            self.a, self.b = torch.zeros(self.size, dim, device=device), torch.zeros(self.size, dim, device=device)
            self.labels = torch.full((self.size,), -1, dtype=torch.long, device=device)
        n = min(len(labels), self.size)  # a global batch larger than the queue leaves its last `size` keys
        slots = (self.next + torch.arange(n, device=labels.device)) % self.size
        for store, new in ((self.a, keys[0]), (self.b, keys[1]), (self.labels, labels)):
            store[slots] = new[len(new) - n :]
        self.next = (self.next + n) % self.size
        self.filled = min(self.filled + n, self.size)

    def state_dict(self) -> dict:
        return {"size": self.size, "filled": self.filled, "next": self.next, "a": self.a, "b": self.b,
                "labels": self.labels}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"the checkpoint's queue holds {state['size']} keys, loss.queue_size is {self.size}")
        self.filled, self.next, self.a, self.b, self.labels = (state[k] for k in ("filled", "next", "a", "b", "labels"))


class NegativeQueue:
    """The queue and, with `momentum` > 0, the momentum encoder whose keys fill it. Kept out of
    the DDP-wrapped model: neither has gradients, and every rank updates its copy identically."""

    def __init__(self, size: int, momentum: float, towers: nn.Module) -> None:
        self.queue = KeyQueue(size)
        self.momentum = momentum
        self.key_towers = AveragedModel(towers, multi_avg_fn=get_ema_multi_avg_fn(momentum), use_buffers=True) \
            if momentum else None

    def memory(self) -> Memory | None:
        return self.queue.memory()

    @torch.no_grad()
    def after_step(self, towers: nn.Module, batch: dict, step_keys: tuple[Tensor, Tensor], chunk: int | None = None) -> None:
        """After the optimizer step: move the momentum encoder towards the towers, and enqueue the
        batch's keys (the momentum encoder's, or the step's own embeddings)."""
        if self.key_towers is None:
            keys = step_keys
        else:
            self.key_towers.update_parameters(towers)
            parts = [self.key_towers.module(c["a"], c["b"]) for c in (split_batch(batch, chunk) if chunk else [batch])]
            keys = tuple(torch.cat(side) for side in zip(*parts))
        self.queue.push(*keys, batch["labels"])

    def state_dict(self) -> dict:
        state = {"queue": self.queue.state_dict()}
        if self.key_towers is not None:
            state["key_towers"] = self.key_towers.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.queue.load_state_dict(state["queue"])
        if self.key_towers is not None:
            self.key_towers.load_state_dict(state["key_towers"])
