"""WordNet (definition, example) pairs: exact parsing on synthetic data files, and the split's guarantees on the
real WordNet 3.0 database from Debian's wordnet-base."""

import gzip
from pathlib import Path

import pytest
import torch

from distributed_cl.data.wordnet import SUPERSENSES, WORDNET_ROOT, load_wordnet, parse_gloss

HEADER = [f"  {i} This software and database is being provided to you, the LICENSEE, by  " for i in range(1, 4)]

# Real-format lines. The verb has pointers, verb frames ("02 + 02 00 + 08 00"), three examples, one with an
# attribution after its closing quote; the noun's definition contains parentheses and a semicolon.
VERB = (
    '00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 003 * 00005041 v 0000 + 03110323 a 0301 '
    '$ 00002325 v 0000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; '
    '"I can breathe better when the air is clean"; "The patient is respiring"; "breathe in, breathe out"- A. Poet  '
)
VERB_DEFINITION = "draw air into, and expel out of, the lungs"
VERB_EXAMPLES = {"I can breathe better when the air is clean", "The patient is respiring", "breathe in, breathe out"}
NOUN = (
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 02083346 n 0000 ~ 01322604 n 0000 | "
    "a member of the genus Canis (probably descended from the common wolf); occurs in many breeds; "
    '"the dog barked all night"  '
)
NOUN_DEFINITION = "a member of the genus Canis (probably descended from the common wolf); occurs in many breeds"
ADJ = '00001740 00 a 01 able 0 001 ! 00002098 a 0101 | having the necessary means or skill; "able to swim"  '
ADV = '00001740 02 r 01 a_cappella 0 000 | without musical accompaniment: "they performed a cappella"  '
NO_EXAMPLE = "00005930 03 n 01 dwarf 0 001 @ 00004475 n 0000 | a plant or animal that is atypically small  "


def write_wordnet(root: Path, noun=(), verb=(), adj=(), adv=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for pos, lines in {"noun": noun, "verb": verb, "adj": adj, "adv": adv}.items():
        (root / f"data.{pos}").write_text("\n".join([*HEADER, *lines]) + "\n")
    return root


def all_pairs(data) -> dict[str, tuple[str, int]]:
    """definition -> (example, label) over both splits."""
    pairs = {}
    for split in (data.train, data.test):
        for anchor, positive, label in zip(split.anchors, split.positives, split.labels.tolist()):
            pairs[anchor] = (positive, label)
    return pairs


# --- parsing, on synthetic files -----------------------------------------------------------------------------------


def test_synthetic_lines_parse_to_exact_definition_example_and_lex_filenum(tmp_path):
    root = write_wordnet(tmp_path, noun=[NOUN, NO_EXAMPLE], verb=[VERB], adj=[ADJ], adv=[ADV])
    chosen = set()
    for seed in range(20):
        pairs = all_pairs(load_wordnet(root, heldout_synsets=1, seed=seed))
        assert pairs.keys() == {VERB_DEFINITION, NOUN_DEFINITION, "having the necessary means or skill",
                                "without musical accompaniment"}
        example, label = pairs[VERB_DEFINITION]
        assert example in VERB_EXAMPLES and label == 29 and SUPERSENSES[label] == "verb.body"
        assert pairs[NOUN_DEFINITION] == ("the dog barked all night", 5)
        assert pairs["having the necessary means or skill"] == ("able to swim", 0)
        assert pairs["without musical accompaniment"] == ("they performed a cappella", 2)
        chosen.add(example)
    assert chosen == VERB_EXAMPLES  # the example is drawn at random, not always the first


@pytest.mark.parametrize(
    "gloss, definition, examples",
    [
        ('to swell, "her face puffed up"; "puffed out chests"', "to swell", ["her face puffed up", "puffed out chests"]),
        ('strong;"the pungent taste"; "the acrid smell";', "strong", ["the pungent taste", "the acrid smell"]),
        ('a demand in the phrase "the call of duty"', 'a demand in the phrase "the call of duty"', []),
        ('said as "on behalf of" (not "in"); "signed on behalf of the minor"', 'said as "on behalf of" (not "in")',
         ["signed on behalf of the minor"]),
        ('deliver; "every right implies a responsibility; every duty, a cost"- J. Doe', "deliver",
         ["every right implies a responsibility; every duty, a cost"]),
        ('put together; "they make toys"; "a notice of sale', "put together", ["they make toys", "a notice of sale"]),
        ('lowercase; ""; "small a"', "lowercase", ["small a"]),
    ],
)
def test_parse_gloss(gloss, definition, examples):
    assert parse_gloss(gloss) == (definition, examples)


def test_test_pool_has_unique_targets_and_no_text_shared_with_train(tmp_path):
    lines = [
        f"{i:08d} 05 n 01 w{i} 0 000 | definition {i % 6}; "
        f'"example {i % 4}"; "example {i % 4}"'
        for i in range(24)
    ]  # 24 synsets but only 6 distinct definitions and 4 distinct examples
    root = write_wordnet(tmp_path, noun=lines)
    for seed in range(10):
        data = load_wordnet(root, heldout_synsets=2, seed=seed)
        assert len(data.test) == 2
        assert len(set(data.test.anchors)) == 2 and len(set(data.test.positives)) == 2
        test_texts = set(data.test.anchors) | set(data.test.positives)
        assert not test_texts & (set(data.train.anchors) | set(data.train.positives))
        assert len(data.train) > 0


def test_missing_root_or_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        load_wordnet(tmp_path / "nowhere")
    (tmp_path / "data.noun").write_text(NOUN + "\n")
    with pytest.raises(FileNotFoundError, match="data.verb"):
        load_wordnet(tmp_path)


def test_bad_heldout_raises_value_error(tmp_path):
    root = write_wordnet(tmp_path, noun=[NOUN], verb=[VERB], adj=[ADJ], adv=[ADV])
    for heldout in (0, -1, 4, 100):  # 4 synsets with examples: 4 or more leave no train pairs
        with pytest.raises(ValueError, match="heldout_synsets"):
            load_wordnet(root, heldout_synsets=heldout)


# --- the real WordNet 3.0 ------------------------------------------------------------------------------------------

real_only = pytest.mark.skipif(
    not all((Path(WORDNET_ROOT) / f"data.{pos}").is_file() for pos in ("noun", "verb", "adj", "adv")),
    reason=f"WordNet 3.0 not installed at {WORDNET_ROOT} (apt-get install wordnet-base)",
)


@pytest.fixture(scope="module")
def real():
    return load_wordnet(heldout_synsets=2000, seed=0)


def test_supersenses_are_the_lexnames_in_lex_filenum_order():
    assert len(SUPERSENSES) == 45 and len(set(SUPERSENSES)) == 45
    man = Path("/usr/share/man/man5/lexnames.5WN.gz")  # WordNet's own table, from wordnet-base
    if not man.is_file():
        pytest.skip(f"{man} not installed")
    rows = [line.split() for line in gzip.open(man, "rt") if line[:2].isdigit()]
    assert {int(row[0]): row[1] for row in rows} == dict(enumerate(SUPERSENSES))


@real_only
def test_every_real_lex_filenum_names_a_supersense_of_its_file_pos():
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (Path(WORDNET_ROOT) / f"data.{pos}").read_text().splitlines():
            if not line.startswith("  "):
                assert SUPERSENSES[int(line.split()[1])].split(".")[0] == pos, line[:80]


@real_only
def test_real_sizes_labels_and_known_synsets(real):
    n_train, n_test = len(real.train), len(real.test)
    assert n_test == 2000
    assert 25_000 <= n_train + n_test <= 40_000
    for split in (real.train, real.test):
        assert len(split.anchors) == len(split.positives) == len(split.labels)
        assert split.labels.dtype == torch.int64
        assert 0 <= split.labels.min() and split.labels.max() < len(SUPERSENSES)
        assert all(split.anchors) and all(split.positives)
    assert len(real.train.labels.unique()) >= 40 and len(real.test.labels.unique()) >= 30
    pairs = all_pairs(real)
    # dog.n.01 and breathe.v.01, read off data.noun / data.verb by hand
    dog = ("a member of the genus Canis (probably descended from the common wolf) that has been domesticated by man "
           "since prehistoric times; occurs in many breeds")
    assert pairs[dog] == ("the dog barked all night", SUPERSENSES.index("noun.animal"))
    example, label = pairs["draw air into, and expel out of, the lungs"]
    assert example in {"I can breathe better when the air is clean", "The patient is respiring"}
    assert SUPERSENSES[label] == "verb.body"


@real_only
def test_real_split_is_held_out_by_text(real):
    train_texts = set(real.train.anchors) | set(real.train.positives)
    assert not set(real.test.anchors) & train_texts
    assert not set(real.test.positives) & train_texts
    assert len(set(real.test.anchors)) == len(set(real.test.positives)) == len(real.test)


@real_only
def test_real_is_deterministic_in_seed_and_max_train_pairs_truncates(real):
    again = load_wordnet(heldout_synsets=2000, seed=0, max_train_pairs=100)
    assert again.test.anchors == real.test.anchors and again.test.positives == real.test.positives
    assert torch.equal(again.test.labels, real.test.labels)
    assert again.train.anchors == real.train.anchors[:100] and again.train.positives == real.train.positives[:100]
    assert torch.equal(again.train.labels, real.train.labels[:100])

    other = load_wordnet(heldout_synsets=2000, seed=1)
    assert len(set(other.test.anchors) & set(real.test.anchors)) < 500  # ~2000 * 2000 / 33k expected by chance
    same, other_pairs = all_pairs(real), all_pairs(other)
    differs = sum(same[d][0] != other_pairs[d][0] for d in same.keys() & other_pairs.keys())
    assert differs > 1000  # a quarter of synsets have several examples: the draw changes with the seed
