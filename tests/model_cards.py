"""A model card read back as the Hub reads it (huggingface_hub's ModelCard: the front matter and
its model-index), and its loading snippet run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distributed_cl.model_card import Training, write_cards

FIGURES = {"recall@1": (0.75, 0.5, 0.125)}


def write_test_cards(task, towers, directory: Path, more: list = ()) -> None:
    """The cards of `task`'s exports (and `more` exports) in `directory`, for a run described by
    made-up facts."""
    facts = Training(name="run", task=task.name, base_model=task.base_model, data="jsonl rows.jsonl (100 training rows)",
                     datasets=["rows.jsonl"], loss={"name": "infonce", "temperature": 0.05}, global_batch_size=32,
                     steps=10, hardware="2 Ray Train workers, CPU", metrics=FIGURES)
    write_cards(str(directory), [*task.exports(towers), *more], facts, str(directory))


def check_model_card(directory: Path, library: str, base_model: str | None, figures: dict) -> dict:
    """The card in `directory`: its library, base model and held-out figures (each metric's
    trained value in the model-index, all three in the table); returns what its snippet made."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(Path(directory) / "README.md")
    assert card.data.library_name == library and card.data.base_model == base_model, card.data
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        name: pytest.approx(values[0], abs=1e-4) for name, values in figures.items() if values[0] is not None}
    for name, values in figures.items():
        row = next(line for line in card.text.splitlines() if line.startswith(f"| {name} |"))
        cells = [None if c.strip() == "-" else float(c) for c in row.strip("|").split("|")[1:]]
        assert cells == [v if v is None else pytest.approx(v, abs=1e-4) for v in values], row
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, re.S)
    namespace: dict = {}
    exec(snippet, namespace)  # as written in the card
    return namespace
