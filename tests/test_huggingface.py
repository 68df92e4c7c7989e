"""`dataset.format: huggingface`: directories written by `datasets`' save_to_disk (a DatasetDict's
splits, a single Dataset), streamed through real Ray Data one Arrow file per read task; the checks
before Ray starts; a Hub dataset's download (load_dataset stood in for: the tests run offline)."""

from __future__ import annotations

import sys

import pytest
from own_data import CLASSES, rows

from distributed_cl.config import Config, ConfigError
from distributed_cl.data.formats import decoded_dataset, materialize
from distributed_cl.tasks import TASKS

datasets = pytest.importorskip("datasets")

TRAIN, TEST = range(0, 40), range(100, 112)  # the row numbers of each split: anchors read "question {i} about ..."
SHARDS = {"train": 4, "test": 2}
PAIRS = ["task=text", "dataset.format=huggingface", "dataset.columns.a=anchor", "dataset.columns.b=positive",
         "train.global_batch_size=8"]


def hf_rows(numbers: range):
    features = datasets.Features({"anchor": datasets.Value("string"), "positive": datasets.Value("string"),
                                  "caption": datasets.Value("string"), "label": datasets.Value("string"),
                                  "image": datasets.Image()})
    data = rows(len(numbers), numbers.start)
    columns = {k: [r[k] for r in data] for k in ("anchor", "positive", "caption", "label")}
    return datasets.Dataset.from_dict(columns | {"image": [{"bytes": r["png"], "path": None} for r in data]},
                                      features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict (train: 40 rows in 4 Arrow files, test: 12 in 2) and a single Dataset (30 rows, 3 files)."""
    root = tmp_path_factory.mktemp("hf")
    datasets.DatasetDict(train=hf_rows(TRAIN), test=hf_rows(TEST)).save_to_disk(root / "dict", num_shards=SHARDS)
    hf_rows(range(30)).save_to_disk(root / "single", num_shards=3)
    return root


def numbers(texts) -> list[int]:
    """The row numbers that own_data's texts name ("question 7 about red", "a red square number 7")."""
    return [next(int(word) for word in t.split() if word.isdigit()) for t in texts]


@pytest.mark.usefixtures("local_ray")
def test_a_split_streams_every_row_once_file_by_file_in_a_seeded_order(saved):
    config = Config.load(overrides=[*PAIRS, f"dataset.path={saved}/dict", "dataset.eval_split=test"])

    def order(seed: int) -> list[int]:
        table, skipped, _ = materialize(decoded_dataset(config.dataset, TASKS["text"].sides, "train", seed), False)
        assert skipped == 0
        return numbers(table.a)

    first = order(0)
    assert sorted(first) == list(TRAIN)  # every row of the train split, once; none of test's
    files = [first[i : i + 10] for i in range(0, 40, 10)]  # a file's record batches in order, files shuffled
    assert all(f == list(range(f[0], f[0] + 10)) for f in files) and [f[0] for f in files] != [0, 10, 20, 30]
    assert order(0) == first and order(1) != first  # the same order for a seed, another for another seed
    # end to end: eval_split's rows are the held-out ones, the training split whole (cached)
    splits = TASKS["text"].load_data(config.model_copy(update={"dataset": config.dataset.model_copy(
        update={"cache": True})}))
    assert sorted(numbers(splits.train.a)) == list(TRAIN) and sorted(numbers(splits.test.a)) == list(TEST)
    assert splits.train_rows == 40 and splits.skipped_rows == 0


@pytest.mark.usefixtures("local_ray")
def test_image_bytes_decode_and_a_single_dataset_holds_out_a_seeded_fraction(saved):
    config = Config.load(overrides=["task=image_text", "dataset.format=huggingface", f"dataset.path={saved}/single",
                                    "dataset.columns.a=image", "dataset.columns.b=caption", "dataset.image_size=8",
                                    "dataset.eval_fraction=0.25", "dataset.cache=true", "train.global_batch_size=8"])
    splits = TASKS["image_text"].load_data(config)
    train, test = numbers(splits.train.b), numbers(splits.test.b)
    assert sorted(train + test) == list(range(30)) and 2 <= len(test) <= 15 and splits.skipped_rows == 0
    assert splits.train.a.shape[1:] == (3, 8, 8)
    for pixels, i in zip(splits.train.a, train):  # own_data's images: the class colour dominates
        red, green, blue = pixels.float().mean(dim=(1, 2)).tolist()
        colour = CLASSES[i % len(CLASSES)]
        assert colour == "grey" or {"red": red, "green": green, "blue": blue}[colour] == max(red, green, blue)


def test_config_errors_name_the_field_and_what_the_data_has(saved, tmp_path):
    dd = f"dataset.path={saved}/dict"
    assert Config.load(overrides=[*PAIRS, dd]).dataset.split == "train"  # no eval_split: eval_fraction of train
    cases = {
        r"dataset.columns.b: column 'answer' is not in .*dict/train/data-00000-of-00004.arrow "
        r"\(its columns: anchor, positive, caption, label, image\)": [dd, "dataset.columns.b=answer"],
        r"dataset.split: 'validation' is not a split of .*dict \(its splits: train, test\)": [
            dd, "dataset.split=validation"],
        r"dataset.eval_split: 'dev' is not a split of .*dict \(its splits: train, test\)": [dd, "dataset.eval_split=dev"],
        r"dataset.eval_split=test needs a DatasetDict \(splits\); .*single is one Dataset": [
            f"dataset.path={saved}/single", "dataset.eval_split=test"],
        r"dataset.path: .*plain is not a directory save_to_disk wrote": [f"dataset.path={tmp_path}/plain"],
        r"dataset.path: 40 rows \(about 40 for training\) cannot fill one global batch": [
            dd, "dataset.eval_split=test", "train.global_batch_size=64"],
        r"dataset.path: /nowhere/saved is neither a directory save_to_disk wrote nor, with dataset.download: false": [
            "dataset.path=/nowhere/saved"],
        r"dataset.path: sentence-transformers/all-nli is neither .* set dataset.download: true to download it": [
            "dataset.path=sentence-transformers/all-nli", "dataset.subset=triplet"],
        r"dataset.subset names a configuration of a Hub dataset; .*dict is a local path": [dd, "dataset.subset=x"],
        "dataset.format must be one of imagefolder, csv, jsonl, parquet, webdataset, huggingface": [
            "dataset.format=arrow", "dataset.path=x"],
    }
    (tmp_path / "plain").mkdir()
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            Config.load(overrides=[*PAIRS, *overrides])


def test_a_hub_dataset_downloads_once_into_the_cache_before_ray_starts(tmp_path, monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None):  # the Hub, offline: a split of the test's rows
        calls.append((path, name, split))
        return hf_rows(TRAIN if split == "train" else TEST)

    hub = [*PAIRS, "dataset.path=someone/pairs", "dataset.subset=triplet", "dataset.eval_split=test",
           "dataset.download=true", f"dataset.cache_dir={tmp_path}/cache"]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "datasets", None)  # not installed
        with pytest.raises(ConfigError, match=r"dataset.path: downloading the Hub dataset someone/pairs needs the "
                                              r"datasets package: pip install 'distributed_cl\[hf\]'"):
            Config.load(overrides=hub)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = Config.load(overrides=hub)
    assert calls == [("someone/pairs", "triplet", "train"), ("someone/pairs", "triplet", "test")]
    x = config.resolve_paths().dataset
    assert x.path == "someone/pairs" and x.cache_dir == f"{tmp_path}/cache"  # a name, not made a local path
    fs, files, root = x.listing()
    assert root == f"{tmp_path}/cache/someone--pairs/triplet/train" and len(files) == 1 and x.count(fs, files) == 40
    assert x.count(*x.listing(held_out=True)[:2]) == 12
    Config.load(overrides=hub)
    assert len(calls) == 2  # the saved copy is read again, not downloaded
