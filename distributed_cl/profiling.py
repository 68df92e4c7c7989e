"""The largest tensors a computation makes, seen op by op through a TorchDispatchMode: how the
loss benchmark and the tests show what a rank holds at once (the n x n logits or only tiles of
them, every gathered embedding or one neighbour's block)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensors(TorchDispatchMode):
    """While active (autograd's backward included): `numel`, the most elements of any tensor an
    op returns, and `rows`, the most rows of any 2-d one `width` columns wide (embeddings of that
    dimension, or their gradients)."""

    def __init__(self, width: int | None = None) -> None:
        super().__init__()
        self.width, self.numel, self.rows = width, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
                if t.dim() == 2 and t.shape[1] == self.width:
                    self.rows = max(self.rows, t.shape[0])
        return out
