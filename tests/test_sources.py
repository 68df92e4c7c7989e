"""dataset.sources without Ray: the options (names, weights, the rules every source shares), each
source's files checked before Ray starts, and the seeded schedule of sources over the steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distributed_cl.config import Config, ConfigError
from distributed_cl.data.sources import SourcesOptions, source_of_step
from distributed_cl.tasks import TASKS


def write_pairs(path, n: int = 40, label: bool = False):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"q": f"q {i}", "a": f"a {i}", **({"label": i % 4} if label else {})}) + "\n")
    return str(path)


def sources_config(*sources: dict, overrides=()) -> Config:
    return Config.load(overrides=["task=text", "loss.name=infonce", "train.global_batch_size=8",
                                  f"dataset={json.dumps({'sources': list(sources)})}", *overrides])


def source(path, **more) -> dict:
    return {"format": "jsonl", "path": path, "columns": {"a": "q", "b": "a"}, **more}


def test_sources_are_named_weighted_and_each_scored_under_its_name(tmp_path):
    qa, nli = write_pairs(tmp_path / "qa.jsonl"), write_pairs(tmp_path / "all-nli.v2.jsonl")
    config = sources_config(source(qa, weight=3), source(nli))
    assert isinstance(config.dataset, SourcesOptions)
    assert [d.name for d in config.datasets] == ["qa", "all-nli"] and config.dataset.weights.tolist() == [3.0, 1.0]
    assert TASKS["text"].all_metric_names(config) == ("qa_recall@1", "qa_recall@10", "all-nli_recall@1",
                                                      "all-nli_recall@10")
    assert [c.dataset.path for c in config.source_configs()] == [qa, nli]
    again = Config.from_dict(config.to_dict())  # as a worker rebuilds it
    assert again.dataset == config.dataset and again.resolve_paths().dataset.sources[1].path == nli
    one = Config.load(overrides=["task=text", "loss.name=infonce", "train.global_batch_size=8", "dataset.format=jsonl",
                                 f"dataset.path={qa}", "dataset.columns.a=q", "dataset.columns.b=a"])
    assert one.source_configs() == [one] and TASKS["text"].all_metric_names(one) == ("recall@1", "recall@10")


@pytest.mark.parametrize("case, message", [
    ("weight", "dataset.sources.0.weight: Input should be greater than 0"),
    ("same name", "two sources are named 'qa'"),
    ("bad name", "source 1: name 'a b' must be letters"),
    ("column", "dataset.sources[qa]: dataset.columns.b: column 'nope' is not in"),
    ("path", "dataset.sources[gone]: "),
    ("labels", "some sources have columns.label and some do not"),
    ("empty", "dataset.sources: List should have at least 1 item"),
])
def test_bad_sources_are_refused_before_ray_starts_naming_the_source(tmp_path, case, message):
    qa, labelled = write_pairs(tmp_path / "qa.jsonl"), write_pairs(tmp_path / "labelled.jsonl", label=True)
    sources = {
        "weight": [source(qa, weight=0)],
        "same name": [source(qa), source(qa)],
        "bad name": [source(qa), source(qa, name="a b")],
        "column": [{**source(qa), "columns": {"a": "q", "b": "nope"}}],
        "path": [source(qa), source(str(tmp_path / "gone.jsonl"))],
        "labels": [source(qa), {**source(labelled), "columns": {"a": "q", "b": "a", "label": "label"}}],
        "empty": [],
    }[case]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sources_config(*sources)


def test_the_schedule_is_seeded_by_step_and_follows_the_weights():
    weights = np.array([3.0, 1.0, 0.5])
    steps = [source_of_step(weights, 7, s) for s in range(20000)]
    assert steps[:500] == [source_of_step(weights, 7, s) for s in range(500)]  # a resume draws the same
    assert steps[:500] != [source_of_step(weights, 8, s) for s in range(500)]  # another seed, another order
    expected = weights / weights.sum()
    for seed in range(4):  # each seed's shares, by Pearson's chi-square (2 degrees of freedom: 13.8 at p = 0.001)
        counts = np.bincount([source_of_step(weights, seed, s) for s in range(20000)], minlength=3)
        assert ((counts - 20000 * expected) ** 2 / (20000 * expected)).sum() < 13.8, counts
    assert np.bincount(steps, minlength=3).argmax() == 0
    assert [source_of_step(np.array([1.0]), 0, s) for s in range(10)] == [0] * 10
