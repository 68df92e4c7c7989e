"""LoRA adapters (peft) on a transformers model: its weights frozen, low-rank updates of the named
linear layers trained. The optimizer and the checkpoints hold only the adapters (the base model is
rebuilt from the config); exports are the merged weights, in the usual formats, plus the adapter
alone (`adapter/`, which `peft.PeftModel.from_pretrained(base, path)` loads)."""

from __future__ import annotations

import copy
import os
from typing import Any

from pydantic import Field, PositiveInt
from torch import nn

from distributed_cl.model_card import Export
from distributed_cl.options import Options

ADAPTER_DIR = "adapter"
INSTALL = "pip install 'distributed_cl[lora]'"


class LoraOptions(Options):
    """`lora: {r, alpha, dropout, target_modules}` on a tower."""

    r: PositiveInt = 16  # the rank of each update
    alpha: float = Field(32.0, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)  # on the adapters' input
    # the names (or name suffixes) of the linear layers that get an adapter, e.g. [q_proj, v_proj];
    # null: peft's choice for the model's architecture (its attention's query and value)
    target_modules: list[str] | None = None


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(f"lora needs the peft package: {INSTALL}") from None
    return peft


def peft_installed() -> str | None:
    """Why LoRA cannot run here, or None."""
    try:
        _peft()
    except ImportError as e:
        return str(e)
    return None


def target_modules(model: nn.Module, options: LoraOptions) -> list[str]:
    """The layers `options` names, checked against `model`: each must match a linear layer."""
    names = options.target_modules
    if names is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULTS:
            raise ValueError(f"lora.target_modules: peft has no default for model type {model_type!r}; name the linear "
                             f"layers, e.g. {sorted(linear_names(model))[:6]}")
        names = list(DEFAULTS[model_type])
    linear = linear_names(model)
    missing = [n for n in names if n not in linear]
    if missing:
        raise ValueError(f"lora.target_modules: the model has no linear layer named {', '.join(missing)}; its linear "
                         f"layers are named {', '.join(sorted(linear))}")
    return names


def linear_names(model: nn.Module) -> set[str]:
    """The last name part of each linear layer of `model` (what target_modules matches)."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def with_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """`model` with adapters on the target layers; only the adapters require gradients."""
    peft = _peft()
    config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                             target_modules=target_modules(model, options))
    return peft.get_peft_model(model, config)


def has_lora(model: nn.Module) -> bool:
    return type(model).__name__.startswith("Peft")


def merged(towers: nn.Module) -> nn.Module:
    """A copy of `towers` with every LoRA model in them merged into plain weights, or `towers`
    themselves where they have none."""
    if not any(has_lora(m) for m in towers.modules()):
        return towers
    towers = copy.deepcopy(towers)
    for module in list(towers.modules()):
        for name, child in list(module.named_children()):
            if has_lora(child):
                setattr(module, name, child.merge_and_unload())
    return towers


def save_adapters(towers: nn.Module, directory: str) -> list[Export]:
    """Each LoRA model's adapter alone, as peft saves it (adapter_config.json names the base
    model): `<directory>/adapter`, or `adapter/<module>` where the towers hold several."""
    models = [(name, m) for name, m in towers.named_modules() if has_lora(m)]
    exports = []
    for name, model in models:
        path = ADAPTER_DIR if len(models) == 1 else os.path.join(ADAPTER_DIR, name)
        model.save_pretrained(os.path.join(directory, path))
        base = model.peft_config["default"].base_model_name_or_path
        exports.append(Export(path, "peft", "feature-extraction", LOAD_ADAPTER.replace("{base}", str(base)),
                              f"LoRA adapter ({name})"))
    return exports


LOAD_ADAPTER = """from peft import PeftModel
from transformers import AutoModel

base = AutoModel.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{path}")  # or model.merge_and_unload(): the exported weights"""


def without_adapters(raw: Any) -> Any:
    """A saved config (a mapping) with every `lora` section removed: what builds the merged towers."""
    if isinstance(raw, dict):
        return {k: None if k == "lora" else without_adapters(v) for k, v in raw.items()}
    return raw
