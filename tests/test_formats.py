"""Own data, without the trainer: paths, the config checks, decoding, bad rows, the held-out split,
and the worker-side stream (real Ray Data splits, consumed by threads as the workers would)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from own_data import (
    CLASSES,
    hard_negatives,
    write_csv,
    write_imagefolder,
    write_jsonl,
    write_parquet,
    write_shards,
    write_text_rows,
)
from own_data import rows as own_rows
from ray.data import ExecutionOptions

from distributed_cl.config import Config, ConfigError
from distributed_cl.data.formats import (
    DecodePlan,
    decode_batch,
    decoded_dataset,
    expand_braces,
    held_out,
    materialize,
    resolve,
    stable_id,
)
from distributed_cl.data.stream import PartRun, StreamBatches
from distributed_cl.data.table import Table
from distributed_cl.tasks import TASKS, ContrastiveModel
from distributed_cl.trainer import StreamParts

TINY_MODEL = ["model.width=4", "model.pool=1", "model.projection_hidden=8", "model.projection_dim=8"]


pytestmark = pytest.mark.usefixtures("local_ray")  # Ray Data reads and decodes


def image_config(path, *more: str, batch: int = 8) -> Config:
    return Config.load(overrides=["dataset.format=imagefolder", f"dataset.path={path}", "dataset.image_size=12",
                                  f"train.global_batch_size={batch}", *TINY_MODEL, *more])


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}/p{0..1}") == ["x/p0", "x/p1", "y/p0", "y/p1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_paths_resolve_from_directories_globs_braces_and_file_uris(tmp_path):
    shards = write_shards(tmp_path / "wds", 12, 4)
    (tmp_path / "wds" / "notes.md").write_text("not a shard")
    names = [str(p) for p in shards]
    for path in (tmp_path / "wds", tmp_path / "wds" / "train-*.tar", tmp_path / "wds" / "train-{000000..000002}.tar",
                 f"file://{tmp_path}/wds/train-{{000000..000002}}.tar"):
        _, files, _ = resolve(str(path), ("tar",))
        assert files == names, path
    with pytest.raises(ConfigError, match="dataset.path: .*missing does not exist"):
        resolve(str(tmp_path / "missing"), ("tar",))
    with pytest.raises(ConfigError, match="matches no files"):
        resolve(str(tmp_path / "wds" / "*.parquet"), ("parquet",))


def test_config_errors_name_the_field_and_what_the_data_has(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", 40)
    write_jsonl(tmp_path / "other.jsonl", 10)
    (tmp_path / "odd.jsonl").write_text('{"question": "q", "answer": "a"}\n' * 20)
    text = ["task=text", "dataset.format=jsonl", f"dataset.path={tmp_path}/pairs.jsonl", "train.global_batch_size=8"]
    assert Config.load(overrides=[*text, "dataset.columns.a=anchor", "dataset.columns.b=positive"]).dataset.path
    cases = {
        "dataset.path: .*nowhere.jsonl does not exist": ["dataset.path=/nowhere.jsonl", "dataset.columns.a=anchor",
                                                         "dataset.columns.b=positive"],
        r"dataset.columns.b: column 'answer' is not in .*pairs.jsonl \(its columns: anchor, positive, caption, label\)":
            ["dataset.columns.a=anchor", "dataset.columns.b=answer"],
        "dataset.columns.b is required": ["dataset.columns.a=anchor"],
        "dataset.columns.label is required: loss.name=supcon": ["dataset.columns.a=anchor", "dataset.columns.b=positive",
                                                                 "loss.name=supcon"],
        "dataset.eval_path: .*odd.jsonl has the columns question, answer": [
            "dataset.columns.a=anchor", "dataset.columns.b=positive", f"dataset.eval_path={tmp_path}/odd.jsonl"],
        "40 rows .*cannot fill one global batch of train.global_batch_size=64": [
            "dataset.columns.a=anchor", "dataset.columns.b=positive", "train.global_batch_size=64"],
        "dataset.format must be one of imagefolder, csv, jsonl, parquet, webdataset": ["dataset.format=tfrecord"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            Config.load(overrides=[*text, *overrides])


PAIR_ROWS = ["task=text", "dataset.format=jsonl", "dataset.columns.a=anchor", "dataset.columns.b=positive",
             "train.global_batch_size=8", "dataset.cache=true"]


def test_rows_carry_their_hard_negative_and_pair_label_and_a_bad_label_is_skipped(tmp_path, tiny_bert):
    write_text_rows(tmp_path / "rows.jsonl", 60, bad_is_same=2)
    base = [*PAIR_ROWS, f"dataset.path={tmp_path}/rows.jsonl", f"text.tower.model={tiny_bert}",
            "dataset.max_skipped_fraction=0.1"]
    pairs = Config.load(overrides=[*base, "dataset.columns.is_same=is_same", "loss.name=supcon"])
    assert not pairs.labelled_loss  # pair labels, not classes: no M-per-class batches
    config = Config.load(overrides=[*base, "dataset.columns.negative=negative", "loss.name=infonce"])
    config.dataset.columns.is_same = "is_same"  # both columns at once (no loss takes both), to decode them together
    splits = TASKS["text"].load_data(config)
    assert splits.skipped_rows == 2 and "is_same 2 is not 0/1" in splits.skipped_examples[0]
    table = Table.concat([splits.train, splits.test])
    assert len(table) == 58
    for anchor, positive, (negative,), same in zip(table.a, table.b, table.negative, table.is_same.tolist()):
        i = int(anchor.split()[1])  # one negative a row (h = 1)
        assert negative.startswith(f"answer {i} is ") and negative != positive
        assert same == int(i % 3 != 0) and (positive.startswith(f"answer {i} ") == bool(same))
    # scored on the matching rows only: retrieval has no target for a mismatched pair
    assert len(splits.test.matching()) == int(splits.test.is_same.sum()) < len(splits.test)
    task = TASKS["text"](config, data=splits)
    batch = task.collate(splits.train.head(4))
    assert batch["negative"]["input_ids"].shape[:2] == (4, 1) and batch["is_same"].tolist() == splits.train.is_same[:4].tolist()


def test_several_hard_negatives_a_row_in_listed_columns_or_one_list_column_decode_alike(tmp_path, tiny_bert):
    """negative_1..negative_3 columns (jsonl, as mine_hard_negatives writes them) and one list-valued
    parquet column: the same rows, h = 3; a row short of a negative is skipped, counted and named."""
    import pyarrow.json
    import pyarrow.parquet as pq

    write_text_rows(tmp_path / "rows.jsonl", 60, mismatched=False, negatives=True, broken_negatives=2)
    pq.write_table(pyarrow.json.read_json(tmp_path / "rows.jsonl"), tmp_path / "rows.parquet")
    base = [*PAIR_ROWS, f"text.tower.model={tiny_bert}", "loss.name=infonce", "dataset.max_skipped_fraction=0.1"]
    listed = Config.load(overrides=[*base, f"dataset.path={tmp_path}/rows.jsonl",
                                    "dataset.columns.negative=[negative_1, negative_2, negative_3]"])
    one = Config.load(overrides=[*base, "dataset.format=parquet", f"dataset.path={tmp_path}/rows.parquet",
                                 "dataset.columns.negative=negatives"])
    assert listed.dataset.negatives_per_row() == one.dataset.negatives_per_row() == 3
    by_columns, by_list = TASKS["text"].load_data(listed), TASKS["text"].load_data(one)
    assert by_columns.skipped_rows == by_list.skipped_rows == 2
    assert all(": ValueError: no negative_2" in e for e in by_columns.skipped_examples)
    assert all(": ValueError: negatives holds 2 negatives, not 3" in e for e in by_list.skipped_examples)
    for split in ("train", "test"):  # the same held-out split: a row's key is its content, negatives flat
        x, y = getattr(by_columns, split), getattr(by_list, split)
        assert (x.a, x.b, x.negative, x.digests()) == (y.a, y.b, y.negative, y.digests())
    table = Table.concat([by_columns.train, by_columns.test])
    assert len(table) == 58 and all(negative == tuple(hard_negatives(int(anchor.split()[1])))
                                    for anchor, negative in zip(table.a, table.negative))
    assert Table.concat([table.head(3), table.take([5, 4])]).negative == [table.negative[i] for i in (0, 1, 2, 5, 4)]

    # collated: the n * 3 texts in one call, as (n, 3, length); embedded: (n, 3, d)
    task = TASKS["text"](listed, data=by_columns)
    rows = by_columns.train.head(4)
    batch = task.collate(rows)
    assert batch["negative"]["input_ids"].shape[:2] == (4, 3)
    torch.testing.assert_close(batch["negative"]["input_ids"][2, 1], task.tokenize([rows.negative[2][1]])["input_ids"][0][
        : batch["negative"]["input_ids"].shape[2]])
    net = ContrastiveModel(task.build_towers(listed).eval(), listed.loss.build(), listed.loss)
    with torch.no_grad():
        z_a, z_b, z_negative = net.embed(batch)
        assert z_negative.shape == (4, 3, z_b.shape[1])
        torch.testing.assert_close(z_negative[1, 2], task.encode(net.towers, "b", [rows.negative[1][2]], task.tokenize, "cpu")[0])

    with pytest.raises(ConfigError, match=r"dataset.columns.negative: column 'negative_4' is not in .*rows.jsonl "
                                          r"\(its columns: anchor, positive, .*negative_1"):
        Config.load(overrides=[*base, f"dataset.path={tmp_path}/rows.jsonl", "dataset.columns.negative=[negative_1, negative_4]"])
    with pytest.raises(ConfigError, match="dataset.columns.negative: the list must name distinct columns"):
        Config.load(overrides=[*base, f"dataset.path={tmp_path}/rows.jsonl", "dataset.columns.negative=[negative_1, negative_1]"])


def test_the_cache_decision_counts_every_hard_negative():
    from distributed_cl.data.formats import TEXT_BYTES, Columns, JsonlOptions, should_cache

    def fits(negative) -> bool:
        x = JsonlOptions(path="unread.jsonl", columns=Columns(a="anchor", b="positive", negative=negative), cache_limit_mb=1)
        return should_cache(x, ("text", "text"), rows=2**20 // (4 * TEXT_BYTES))

    assert fits(None) and fits(["negative_1"]) and not fits(["negative_1", "negative_2", "negative_3"])


def test_pair_columns_need_a_loss_that_uses_them(tmp_path):
    write_text_rows(tmp_path / "rows.jsonl", 40)
    base = [*PAIR_ROWS, f"dataset.path={tmp_path}/rows.jsonl"]
    cases = {
        r"dataset.columns.negative: loss.name=supcon does not use it \(the losses that do: infonce\)":
            ["dataset.columns.negative=negative", "loss.name=supcon"],
        r"dataset.columns.is_same: loss.name=infonce does not use it \(the losses that do: ntxent, supcon, contrastive\)":
            ["dataset.columns.is_same=is_same", "loss.name=infonce"],
        "loss.name=contrastive trains on pair-labelled rows: set dataset.columns.is_same": ["loss.name=contrastive"],
        "loss.queue_size with dataset.columns.is_same": ["dataset.columns.is_same=is_same", "loss.name=supcon",
                                                         "loss.queue_size=64"],
        r"dataset.columns.negative: column 'hard' is not in .*rows.jsonl \(its columns: anchor, positive, negative":
            ["dataset.columns.negative=hard", "loss.name=infonce"],
        "dataset.columns.is_same belongs to rows of two sides": ["task=image", "dataset.format=imagefolder",
                                                                  "dataset.columns.is_same=same"],
        "loss.margin applies to contrastive": ["loss.margin=0.3"],
        "loss.distance must be 'cosine' or 'euclidean', got 'manhattan'": ["dataset.columns.is_same=is_same", "loss.name=contrastive",
                                                           "loss.distance=manhattan"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            Config.load(overrides=[*base, *overrides])
    # supcon learns from pair labels without a label column
    assert Config.load(overrides=[*base, "dataset.columns.is_same=is_same", "loss.name=supcon"]).pair_labelled


def test_webdataset_extensions_are_checked_with_their_alternatives(tmp_path):
    write_shards(tmp_path, 16, 8)
    base = ["task=image_text", "dataset.format=webdataset", f"dataset.path={tmp_path}/train-{{000000..000001}}.tar",
            "train.global_batch_size=8"]
    config = Config.load(overrides=[*base, "dataset.columns.a=jpg;png"])  # b defaults to txt
    assert config.dataset.columns.b is None
    with pytest.raises(ConfigError, match=r"extension 'jpg;webp' is not in .*\(its extensions: png, txt, cls\)"):
        Config.load(overrides=[*base, "dataset.columns.a=jpg;webp"])


def test_bad_rows_are_skipped_counted_and_named(tmp_path):
    write_imagefolder(tmp_path, 40)
    (tmp_path / "red" / "broken.png").write_bytes(b"not a png")
    config = image_config(tmp_path, "dataset.cache=true", "dataset.eval_fraction=0.25", "dataset.max_skipped_fraction=0.05")
    splits = TASKS["image"].load_data(config)
    assert splits.skipped_rows == 1 and "red/broken.png: ValueError: not an image Pillow can decode" in splits.skipped_examples[0]
    assert len(splits.train) + len(splits.test) == 40  # nothing else lost
    # more than max_skipped_fraction stops the run, naming examples
    for i in range(3):
        (tmp_path / "blue" / f"bad{i}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"4 of 44 rows \(9.1%\) .*max_skipped_fraction=0.05; e.g. .*png: ValueError: not an image Pillow can decode"):
        TASKS["image"].load_data(image_config(tmp_path, "dataset.cache=true", "dataset.max_skipped_fraction=0.05"))


def test_held_out_rows_are_a_seeded_fraction_kept_out_of_training(tmp_path):
    write_imagefolder(tmp_path, 200)
    config = image_config(tmp_path, "dataset.cache=true", "dataset.eval_fraction=0.2")
    splits = TASKS["image"].load_data(config)
    train, test = set(splits.train.digests()), set(splits.test.digests())
    assert not train & test and len(train) + len(test) == 200
    assert 0.1 < len(test) / 200 < 0.3
    assert (splits.test.labels < len(CLASSES)).all() and splits.test.labelled  # folder names, numbered
    again = TASKS["image"].load_data(config)
    assert again.test.digests() == splits.test.digests() and again.train.digests() == splits.train.digests()
    keys = np.array([f"k{i}" for i in range(10_000)], dtype=object)
    assert abs(held_out(keys, 0, 0.1).mean() - 0.1) < 0.01 and (held_out(keys, 0, 0.1) != held_out(keys, 1, 0.1)).any()


def test_parquet_image_bytes_decode_like_the_csv_image_files_with_string_labels(tmp_path):
    """The same rows as parquet (encoded bytes) and as csv (relative file paths): the same decoded
    images, captions and labels. (The csv rows train end to end in test_own_data.py.)"""
    write_parquet(tmp_path / "pq" / "train.parquet", 24)
    write_csv(tmp_path / "csv" / "train.csv", 24)

    def decoded(fmt, path, image, caption):
        config = Config.load(overrides=["task=image_text", f"dataset.format={fmt}", f"dataset.path={path}",
                                        f"dataset.columns.a={image}", f"dataset.columns.b={caption}",
                                        "dataset.columns.label=label", "dataset.image_size=8",
                                        "train.global_batch_size=8", "dataset.eval_fraction=0.25"])
        parts = [materialize(decoded_dataset(config.dataset, TASKS["image_text"].sides, split, config.train.seed), labelled=True)
                 for split in ("train", "eval")]
        assert all(skipped == 0 for _, skipped, _ in parts)
        table = Table.concat([t for t, _, _ in parts])
        order = sorted(range(len(table)), key=lambda i: table.b[i])  # the held-out rows differ by key
        return table.take(order)

    pq = decoded("parquet", tmp_path / "pq" / "train.parquet", "image", "caption")
    csv = decoded("csv", tmp_path / "csv" / "train.csv", "filepath", "title")
    assert len(pq) == 24 and pq.a.shape[1:] == (3, 8, 8) and pq.a.dtype == torch.uint8
    assert pq.b == csv.b and all(caption.startswith("a ") for caption in pq.b)
    torch.testing.assert_close(pq.a, csv.a, rtol=0, atol=0)
    assert pq.labels.tolist() == csv.labels.tolist()
    assert set(pq.labels.tolist()) == {stable_id(c) for c in CLASSES}
    assert pq.label_names == csv.label_names == {stable_id(c): c for c in CLASSES}  # zero-shot's class prompts


def shard_batches(config: Config, epoch: int = 0, start_batch: int = 0, world: int = 2, m: int | None = None,
                  parts: int | None = None):
    """Every rank's local batches (row digests) of one epoch, through Ray Data's equal split into
    `parts` (by default one a rank) as the trainer configures it."""
    dataset = decoded_dataset(config.dataset, TASKS[config.task].sides, "train", config.train.seed)
    parts = parts or world
    shards = StreamParts(parts, execution_options=ExecutionOptions(preserve_order=True)).configure(
        {"train": dataset}, world, None, None)
    out = [None] * world

    def consume(rank):
        run = shards[rank]["train"]
        stream = StreamBatches(run if isinstance(run, PartRun) else PartRun(rank, [run]),
                               config.train.global_batch_size // parts, config.train.seed,
                               labelled=True, shuffle_buffer=config.dataset.shuffle_buffer, m=m)
        out[rank] = [(b.digests(), b.labels.tolist()) for b in stream.epoch(epoch, start_batch)]
        out[rank].append(stream.dropped_rows)

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(o is not None for o in out), "a rank's stream failed (see the thread's exception above)"
    return out


def test_stream_is_deterministic_equal_per_rank_and_resumes_where_it_stopped(tmp_path):
    write_shards(tmp_path, 120, 10)
    config = Config.load(overrides=["task=image_text", "dataset.format=webdataset", f"dataset.path={tmp_path}",
                                    "dataset.image_size=8", "train.global_batch_size=8", "dataset.eval_fraction=0.1",
                                    "dataset.shuffle_buffer=16"])
    first, second = shard_batches(config), shard_batches(config)
    assert first == second  # same seed, same batches on every rank
    batches = [rank[:-1] for rank in first]
    assert all(len(digests) == 4 for rank in batches for digests, _ in rank)
    rows = [d for rank in batches for digests, _ in rank for d in digests]
    assert len(rows) == len(set(rows))  # no row twice in an epoch
    train_rows = 120 - len(TASKS["image_text"].load_data(config).test)
    assert len(rows) + sum(rank[-1] for rank in first) >= train_rows - 1  # the rest is counted (the split drops < 2)
    resumed = shard_batches(config, start_batch=3)
    assert [rank[:-1] for rank in resumed] == [rank[3:] for rank in batches]
    other_epoch = shard_batches(config, epoch=1)
    assert [rank[:-1] for rank in other_epoch] != batches  # re-shuffled, deterministically, every epoch


def test_stream_groups_give_every_batch_m_of_each_class(tmp_path):
    write_shards(tmp_path, 160, 20)
    config = Config.load(overrides=["task=image_text", "dataset.format=webdataset", f"dataset.path={tmp_path}",
                                    "dataset.columns.label=cls", "dataset.image_size=8", "train.global_batch_size=16",
                                    "dataset.shuffle_buffer=8", "dataset.eval_fraction=0.1"])
    per_rank = shard_batches(config, m=4)
    assert len(per_rank[0]) > 3
    for rank in per_rank:
        for _, labels in rank[:-1]:
            counts = np.unique(labels, return_counts=True)[1]
            assert len(labels) == 8 and (counts % 4 == 0).all(), labels


def test_a_stream_in_parts_gives_the_same_global_batches_to_any_number_of_workers_and_resumes_across_them(tmp_path):
    """An elastic run's stream: 4 parts (its most workers) read by 4, 3 or 1 workers (a run of parts
    each, 2 + 1 + 1 for 3) give the same global batches, each with m of every class it holds, and
    a resume on 3 workers at batch 2 of an epoch that 1 worker began goes on at the same rows."""
    write_shards(tmp_path, 200, 20)
    config = Config.load(overrides=["task=image_text", "dataset.format=webdataset", f"dataset.path={tmp_path}",
                                    "dataset.columns.label=cls", "dataset.image_size=8", "train.global_batch_size=16",
                                    "dataset.shuffle_buffer=8", "dataset.eval_fraction=0.1"])

    def global_batches(per_rank):  # the ranks' local batches side by side, in rank order
        steps = min(len(rank) - 1 for rank in per_rank)
        return [sum((rank[i][0] for rank in per_rank), []) for i in range(steps)], \
               [sum((rank[i][1] for rank in per_rank), []) for i in range(steps)]

    one = shard_batches(config, world=1, parts=4, m=2)
    assert [len(digests) for digests, _ in one[0][:-1]] == [16] * (len(one[0]) - 1) and len(one[0]) > 4
    three = shard_batches(config, world=3, parts=4, m=2)
    assert [len(rank[0][0]) for rank in three] == [8, 4, 4]
    four = shard_batches(config, world=4, m=2)  # one part a worker: Ray Train's own split
    batches, labels = global_batches(one)
    assert global_batches(three)[0] == batches == global_batches(four)[0][:len(batches)]
    assert all((np.unique(b, return_counts=True)[1] % 2 == 0).all() for b in labels)
    resumed = shard_batches(config, world=3, parts=4, m=2, start_batch=2)
    assert global_batches(resumed)[0] == batches[2:]


def test_unlabelled_images_are_scored_by_finding_their_second_view(tmp_path):
    write_parquet(tmp_path / "train.parquet", 64)
    config = Config.load(overrides=["dataset.format=parquet", f"dataset.path={tmp_path}/train.parquet",
                                    "dataset.columns.a=image", "dataset.image_size=12", "dataset.cache=true",
                                    "dataset.eval_fraction=0.5", "train.global_batch_size=8", *TINY_MODEL])
    task = TASKS["image"](config)
    assert task.metric_names(config) == ("view_recall@1",) and not task.data.test.labelled
    towers = task.build_towers(config).eval()
    scores = task.evaluate(towers), task.evaluate(towers)
    assert scores[0] == scores[1]  # the held-out views are fixed by their own seed
    baseline = task.baselines()["view_recall@1_raw_pixels"]
    assert 3 / len(task.data.test) < baseline <= 1.0  # raw pixels find a view's twin far above chance

    class Blind(torch.nn.Module):  # features that ignore the image: chance or worse
        def __init__(self):
            super().__init__()
            self.encoder = lambda x: torch.ones(len(x), 4)

    assert task.evaluate(Blind())["view_recall@1"] <= 1 / len(task.data.test)


@pytest.mark.parametrize("fraction", [1.0, 0.0])  # every row held out / none
def test_a_batch_the_split_empties_keeps_its_column_types(fraction):
    """Ray Data would store an empty batch's image column as pickled objects (with a warning on the
    user's console) beside the tensor column of every other block."""
    from ray.data.block import BlockAccessor

    rows = own_rows(4)
    batch = {"path": np.array(["/d/x.tar"] * 4), "__url__": np.array(["/d/x.tar"] * 4),
             "__key__": np.array([r["key"] for r in rows]), "png": np.array([r["png"] for r in rows], dtype=object),
             "txt": np.array([r["caption"].encode() for r in rows], dtype=object)}
    plan = DecodePlan(sides=("image", "text"), columns={"a": "png", "b": "txt"}, image_size=8, split="eval",
                      seed=0, fraction=fraction, root="/d", classes=(), format="webdataset")
    block = BlockAccessor.batch_to_block(decode_batch(batch, plan))
    full = BlockAccessor.batch_to_block(decode_batch(batch, dataclasses.replace(plan, split=None)))
    assert block.num_rows == (4 if fraction == 1.0 else 0)
    assert block.schema == full.schema and full.num_rows == 4
    assert str(full.schema.field("a").type) == "ArrowTensorTypeV2(shape=(3, 8, 8), dtype=uint8)"
