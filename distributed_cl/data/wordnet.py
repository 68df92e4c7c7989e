"""WordNet text pairs: (definition, example sentence) per synset, labelled by supersense.

The data comes from the Princeton WordNet 3.0 database files ``data.noun``, ``data.verb``, ``data.adj`` and
``data.adv``, as installed by Debian's ``wordnet-base`` package in /usr/share/wordnet. Each synset's gloss holds a
definition followed by quoted example sentences; a synset with at least one example yields one contrastive pair,
and its lexicographer file (``lex_filenum``, one of 45 supersenses such as ``noun.animal``) is its class label.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

WORDNET_ROOT = "/usr/share/wordnet"

# The lexicographer files, indexed by lex_filenum (WordNet's lexnames(5WN)).
SUPERSENSES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all",
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)

_POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

# Examples start at the first quote after a separator. Most glosses use '; "', but a few hundred use ':' or ','
# (or no space), and a quote with no separator before it belongs to the definition ('in the phrase "on the job"').
_EXAMPLES_START = re.compile(r'[;:,]\s*"')
# Examples are separated by ';' before an opening quote; a ';' inside an example is not followed by one.
_EXAMPLE_SPLIT = re.compile(r';\s*(?=")')


@dataclass
class TextPairs:
    """Aligned text pairs: ``anchors[i]`` (a definition) and ``positives[i]`` (an example) share ``labels[i]``."""

    anchors: list[str]
    positives: list[str]
    labels: torch.Tensor  # int64 (n,): supersense id, an index into SUPERSENSES

    def __len__(self) -> int:
        return len(self.anchors)


@dataclass
class WordNetData:
    train: TextPairs
    test: TextPairs


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a gloss into its definition and its non-empty example sentences (without quotes)."""
    start = _EXAMPLES_START.search(gloss)
    if start is None:
        return gloss.strip(), []
    examples = []
    for piece in _EXAMPLE_SPLIT.split(gloss[start.end() - 1 :]):
        text = piece.strip().removeprefix('"')
        # Cut at the closing quote: drops attributions ('"..."- Henry Miller') and stray text after a typo'd quote.
        close = text.find('"')
        text = (text if close < 0 else text[:close]).strip()
        if text:
            examples.append(text)
    return gloss[: start.start()].strip(), examples


def read_synsets(root: str | os.PathLike = WORDNET_ROOT) -> list[tuple[str, list[str], int]]:
    """(definition, examples, lex_filenum) for every synset with a definition and at least one example,
    in file order (noun, verb, adj, adv)."""
    root = Path(root)
    missing = [name for name in _POS_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet not found at {root} (missing {', '.join(missing)}): install Debian's wordnet-base "
            "(apt-get install wordnet-base) or point text.root at a WordNet 3.0 dict directory"
        )
    synsets = []
    for name in _POS_FILES:
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):  # license header
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                continue
            definition, examples = parse_gloss(gloss)
            if definition and examples:
                synsets.append((definition, examples, int(head.split(" ", 2)[1])))
    return synsets


def load_wordnet(
    root: str | os.PathLike = WORDNET_ROOT,
    heldout_synsets: int = 2000,
    seed: int = 0,
    max_train_pairs: int | None = None,
) -> WordNetData:
    """One (definition, example) pair per synset, the example drawn at random; ``heldout_synsets`` random synsets
    form the test split. Deterministic in (root, seed)."""
    if heldout_synsets < 1:
        raise ValueError(f"heldout_synsets must be >= 1, got {heldout_synsets}")
    if max_train_pairs is not None and max_train_pairs < 1:
        raise ValueError(f"max_train_pairs must be >= 1 or None, got {max_train_pairs}")
    synsets = read_synsets(root)
    if heldout_synsets >= len(synsets):
        raise ValueError(
            f"heldout_synsets={heldout_synsets} leaves no train pairs: {root} has {len(synsets)} synsets with examples"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(synsets))
    choice = rng.integers(0, [len(examples) for _, examples, _ in synsets])
    pairs = [(synsets[i][0], synsets[i][1][choice[i]], synsets[i][2]) for i in order]

    # Test takes synsets in permutation order, skipping any whose definition or example repeats one already taken,
    # so retrieval over the test pool has unique targets in both directions and exactly heldout_synsets pairs.
    # Train then drops every pair sharing a string with the test pool, so no test text is seen in training.
    test, rest, test_texts = [], [], set()
    for pair in pairs:
        definition, example, _ = pair
        if len(test) < heldout_synsets and definition not in test_texts and example not in test_texts:
            test.append(pair)
            test_texts.update((definition, example))
        else:
            rest.append(pair)
    train = [pair for pair in rest if pair[0] not in test_texts and pair[1] not in test_texts]
    if len(test) < heldout_synsets or not train:
        raise ValueError(
            f"heldout_synsets={heldout_synsets} leaves {len(test)} test and {len(train)} train pairs "
            f"of {len(synsets)} synsets with examples"
        )
    return WordNetData(train=_text_pairs(train[:max_train_pairs]), test=_text_pairs(test))


def _text_pairs(pairs: list[tuple[str, str, int]]) -> TextPairs:
    return TextPairs(
        anchors=[definition for definition, _, _ in pairs],
        positives=[example for _, example, _ in pairs],
        labels=torch.tensor([label for _, _, label in pairs], dtype=torch.int64),
    )
