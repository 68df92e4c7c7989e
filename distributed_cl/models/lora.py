"""LoRA adapters (peft) on a transformers model: its weights frozen, low-rank updates of the named
linear layers trained. The optimizer and the checkpoints hold only the adapters (the base model is
rebuilt from the config); exports are the merged weights, in the usual formats, plus the adapter
alone (`adapter/`, which `peft.PeftModel.from_pretrained(base, path)` loads)."""

from __future__ import annotations

import copy
import os
import re
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


def target_modules(model: nn.Module, options: LoraOptions, default: list[str] | None = None) -> list[str]:
    """The layers `options` names, checked against `model`: each must match a linear layer. Where
    it names none: `default`, else peft's default for the model's architecture."""
    names = options.target_modules or default
    if names is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULTS:
            raise ValueError(f"lora.target_modules: name the linear layers to adapt (peft has no default for this "
                             f"model), e.g. {sorted(linear_names(model))[:6]}")
        names = list(DEFAULTS[model_type])
    linear = linear_names(model)
    missing = [n for n in names if n not in linear]
    if missing:
        raise ValueError(f"lora.target_modules: the model has no linear layer named {', '.join(missing)}; its linear "
                         f"layers are named {', '.join(sorted(linear))}")
    return names


def adaptable_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of each linear layer of `model` that runs as a module: not the output
    projection of a torch MultiheadAttention, whose weight it reads directly (an adapter there would
    never run)."""
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside_attention]


def linear_names(model: nn.Module) -> set[str]:
    """The last name part of each linear layer of `model` (what target_modules matches)."""
    return {name.rsplit(".", 1)[-1] for name, _ in adaptable_linears(model)}


def with_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """`model` with adapters on the target layers; only the adapters require gradients."""
    peft = _peft()
    config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                             target_modules=target_modules(model, options))
    return peft.get_peft_model(model, config)


def with_tower_lora(model: nn.Module, towers: dict[str, tuple[list[nn.Module], LoraOptions | None]],
                    default: list[str] | None = None) -> nn.Module:
    """A dual encoder `model` as one peft model (its adapter loads onto the whole model) with
    adapters on the layers of each tower that has options: {tower: (its modules, options)}. Each
    tower keeps its own rank and alpha; a tower without options gets none, and its weights stay
    frozen like the rest. Errors name the tower (`image_tower.lora...`)."""
    peft = _peft()
    targets: dict[str, list[str]] = {}
    for tower, (modules, options) in towers.items():
        if options is None:
            continue
        try:
            names = set(target_modules(nn.ModuleList(modules), options, default))
        except ValueError as e:
            raise ValueError(f"{tower}.{e}") from None
        inside = {id(m) for root in modules for m in root.modules()}
        targets[tower] = [name for name, m in adaptable_linears(model)
                          if id(m) in inside and name.rsplit(".", 1)[-1] in names]
    chosen = {tower: towers[tower][1] for tower in targets}
    first = next(iter(chosen.values()))
    if len({o.dropout for o in chosen.values()}) > 1:
        raise ValueError(f"{' and '.join(f'{t}.lora.dropout' for t in chosen)} differ: one adapter takes one dropout")
    # Whole names, anchored: peft would match a listed name as the suffix of another tower's layer
    # (open_clip: transformer.* is also visual.transformer.*). Each tower its own rank and alpha.
    exact = {t: ["^" + re.escape(name) for name in names] for t, names in targets.items()}
    ranks = {key: o.r for t, o in chosen.items() if o.r != first.r for key in exact[t]}
    alphas = {key: o.alpha for t, o in chosen.items() if o.alpha != first.alpha for key in exact[t]}
    layers = "|".join(name[1:] for names in exact.values() for name in names)
    config = peft.LoraConfig(r=first.r, lora_alpha=first.alpha, lora_dropout=first.dropout, rank_pattern=ranks,
                             alpha_pattern=alphas, target_modules=f"(?:{layers})")  # a string: a full match
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


def save_adapters(towers: nn.Module, directory: str, load_base: str | None = None) -> list[Export]:
    """Each LoRA model's adapter alone, as peft saves it (adapter_config.json names the base
    model): `<directory>/adapter`, or `adapter/<module>` where the towers hold several.
    `load_base`: the lines that load the base model as `base` (the card's snippet), by default
    transformers' AutoModel from the base the adapter names."""
    models = [(name, m) for name, m in towers.named_modules() if has_lora(m)]
    exports = []
    for name, model in models:
        path = ADAPTER_DIR if len(models) == 1 else os.path.join(ADAPTER_DIR, name)
        model.save_pretrained(os.path.join(directory, path))
        base = model.peft_config["default"].base_model_name_or_path
        load = (load_base or LOAD_TRANSFORMERS_BASE.replace("{base}", str(base))) + LOAD_ADAPTER
        exports.append(Export(path, "peft", "feature-extraction", load, f"LoRA adapter ({name})"))
    return exports


LOAD_TRANSFORMERS_BASE = """from transformers import AutoModel

base = AutoModel.from_pretrained("{base}")
"""
LOAD_ADAPTER = """from peft import PeftModel

model = PeftModel.from_pretrained(base, "{path}")  # or model.merge_and_unload(): the exported weights"""


def without_adapters(raw: Any) -> Any:
    """A saved config (a mapping) with every `lora` section removed: what builds the merged towers."""
    if isinstance(raw, dict):
        return {k: None if k == "lora" else without_adapters(v) for k, v in raw.items()}
    return raw
