"""What a loss declares to be named in a config (`loss.name`): its options, how to build it, and
how it consumes a batch's paired embeddings.

Each loss module defines its options model beside the loss (`NTXentOptions` in ntxent.py, ...),
a subclass of `LossOptions`; `losses/__init__.py` registers it once in LOSSES. A range a loss
needs is checked by the loss's constructor: building the loss is part of validating its options,
and the constructor's error names the option."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, NonNegativeInt, model_validator
from torch import Tensor, nn

from distributed_cl.losses.core import Memory
from distributed_cl.losses.labels import pair_labels
from distributed_cl.options import Options, field_error


class LossOptions(Options):
    """The `loss` section when `loss.name` is this loss."""

    name: str
    labelled: ClassVar[bool] = False  # needs class labels: every global batch then holds m samples per class
    rows: ClassVar[tuple[str, ...]] = ()  # per-row dataset columns it can use: "negative", "is_same"
    needs_is_same: ClassVar[bool] = False  # trains on pair-labelled rows only

    def build(self) -> nn.Module:
        raise NotImplementedError

    def __call__(self, loss_fn: nn.Module, z_a: Tensor, z_b: Tensor, labels: Tensor, memory: Memory | None = None,
                 negative: Tensor | None = None, is_same: Tensor | None = None):
        """The loss of a batch's paired embeddings: z_a[i] and z_b[i] are each other's positive
        (two views, a text pair, an image and its caption); with the rows' hard negatives every
        query meets them too; with pair labels, positives only where is_same."""
        if is_same is not None:
            return loss_fn(torch.cat([z_a, z_b]), labels=torch.cat(pair_labels(is_same)), memory=memory)
        if negative is not None:
            return loss_fn(z_a, z_b, memory=memory, hard_negatives=negative)
        return loss_fn(z_a, z_b, memory=memory)

    @model_validator(mode="after")
    def _builds(self) -> LossOptions:
        try:
            self.build()
        except ValueError as e:  # the constructor's message starts with the option's name
            field = str(e).split(" ", 1)[0]
            raise field_error(field if field in type(self).model_fields else "", str(e)) from None
        return self


class SoftmaxOptions(LossOptions):
    """The options of the softmax (InfoNCE-family) losses."""

    temperature: float = 0.5
    # compute the loss in (chunk_size x chunk_size) tiles of logits, recomputed in backward
    # (losses/tiled.py): the same values in O(chunk^2) memory instead of O(local x global batch);
    # turn it on when the logits no longer fit (e.g. 4096 on a GPU past a 32k global batch)
    chunk_size: int | None = None
    # keep the last queue_size keys of each side as extra negatives (0: none); with
    # train.momentum the keys come from a momentum encoder (queue.py)
    queue_size: NonNegativeInt = 0


class NegativeWeighting(LossOptions):
    """Leave the positive out of the denominator (DCL), and weight each negative by
    e^(beta * logit) normalised to mean 1 (HCL; 0: every negative counts the same)."""

    decoupled: bool = False
    hard_negative_beta: float = 0.0


class LabelledOptions(LossOptions):
    """A loss that learns from class labels."""

    m: int = Field(4, ge=2)  # samples per class in each global batch
