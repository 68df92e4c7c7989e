"""Model cards: a README.md in each export directory, in the Hugging Face Hub's convention (YAML
front matter: base model, library, pipeline tag, datasets, tags, and the held-out figures as a
model-index), saying how the model was made (data, loss and its options, batch, steps,
hardware), its figures beside the untrained model's and the baseline's, and how to load it with
its library. Pure: text in, text out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(frozen=True)
class Export:
    """One exported model: `path` under the export directory ("" for files at its top, such as
    towers.pt or open_clip.pt), the Hub's `library` name and `pipeline_tag`, and a Python snippet
    that loads it, where {path} stands for the export's location."""

    path: str
    library: str
    pipeline_tag: str
    load: str
    title: str


@dataclass(frozen=True)
class Training:
    """How the run made the model, and its final figures: {metric: (trained, untrained, baseline)}."""

    name: str
    task: str
    base_model: str | None
    data: str  # the data in words: format, location, rows used
    datasets: list[str]
    loss: dict[str, Any]
    global_batch_size: int
    steps: int
    hardware: str
    metrics: dict[str, tuple[float | None, float | None, float | None]] = field(default_factory=dict)
    baseline_name: str = "baseline"
    eval_data: str = "the held-out split"


def card(export: Export, training: Training, location: str) -> str:
    """The README.md of `export`, to be found at `location` (the snippet loads from there)."""
    loss_name = training.loss.get("name", "?")
    front: dict[str, Any] = {
        **({"base_model": training.base_model} if training.base_model else {}),
        "library_name": export.library,
        "pipeline_tag": export.pipeline_tag,
        "tags": ["distributed_cl", "contrastive-learning", f"loss:{loss_name}", training.task],
        **({"datasets": training.datasets} if training.datasets else {}),
        "metrics": sorted(training.metrics),
        "model-index": [{"name": training.name, "results": [{
            "task": {"type": export.pipeline_tag},
            "dataset": {"name": training.eval_data, "type": training.datasets[0] if training.datasets else "custom"},
            "metrics": [{"type": name, "value": round(values[0], 4), "name": f"held-out {name}"}
                        for name, values in training.metrics.items() if values[0] is not None]}]}],
    }
    options = ", ".join(f"`{k}={v}`" for k, v in training.loss.items() if k != "name")
    rows = "\n".join(f"| {name} | {_cell(t)} | {_cell(u)} | {_cell(b)} |" for name, (t, u, b) in training.metrics.items())
    snippet = export.load.replace("{path}", location)
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {training.name}: {export.title}

Trained with distributed_cl (contrastive learning on Ray){
    f" from `{training.base_model}`" if training.base_model else " from scratch"}.

## Training

| | |
|---|---|
| task | {training.task} |
| data | {training.data} |
| loss | {loss_name}{f" ({options})" if options else ""} |
| global batch | {training.global_batch_size} |
| steps | {training.steps} |
| hardware | {training.hardware} |

## Held-out figures

On {training.eval_data}: the trained model, the same model before training, and the task's baseline.

| metric | trained | untrained | {training.baseline_name} |
|---|---:|---:|---:|
{rows}

## Use

```python
{snippet}
```
"""


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_cards(directory: str, exports: list[Export], training: Training, location: str) -> list[str]:
    """A README.md in `directory`/<export.path> for each export whose files are there; `location`:
    where `directory` will be for the user (the snippets load from there). Returns the files."""
    written = []
    for export in exports:
        target = os.path.join(directory, export.path)
        if not os.path.exists(target):
            continue
        path = os.path.join(target, "README.md")
        with open(path, "w") as f:
            f.write(card(export, training, location.rstrip("/") + (f"/{export.path}" if export.path else "")))
        written.append(path)
    return written
