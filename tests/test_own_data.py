"""Own data end to end through train.py with 2 workers: every format, held in memory and streamed
through Ray Data, local paths and file:// URIs; a killed worker resumes a stream mid-epoch with no
row repeated or skipped; bad rows counted; config errors exit 2 before Ray starts."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from own_data import write_csv, write_imagefolder, write_jsonl, write_shards, write_text_rows
from test_tasks import logged
from test_train_cli import ROOT, run_env, train_worker_pids

from distributed_cl import trainer
from distributed_cl.config import Config, ConfigError
from distributed_cl.data.formats import TooManySkippedRows, held_out

SMALL_CNN = ["model.width=8", "model.pool=2", "model.projection_hidden=32", "model.projection_dim=16"]
IMAGE_TEXT = ["task=image_text", "image_text.image_tower.width=8", "image_text.image_tower.pool=2",
              "image_text.image_tower.projection_hidden=32", "image_text.image_tower.projection_dim=16",
              "image_text.text_tower.max_length=16", "image_text.text_tower.freeze=false"]
RUN = ["train.num_workers=2", "train.global_batch_size=16", "train.log_every=4", "train.checkpoint_every=8",
       "optim.warmup_steps=2", "optim.lr=0.003", "dataset.image_size=16", "dataset.eval_fraction=0.2"]
STREAM = ["dataset.cache=false", "train.cpus_per_worker=0.5", "dataset.decode_cpus=0.5"]


def command(tmp_path, name, overrides, max_steps=16):
    cmd = [sys.executable, str(ROOT / "train.py"), "--storage-path", str(tmp_path / "runs"), "--name", name,
           "--output-json", str(tmp_path / f"{name}.json"), "--max-steps", str(max_steps)]
    for item in [*RUN, *overrides]:
        cmd += ["--set", item]
    return cmd


def train(tmp_path, name, overrides, capsys, max_steps=16):
    """trainer.run as train.py calls it, in this process; returns the summary and the console output."""
    config = Config.load(overrides=[*RUN, *overrides, f"train.max_steps={max_steps}", "train.epochs=null",
                                    f"train.name={name}", f"train.storage_path={tmp_path}/runs"])
    summary = trainer.run(config)
    captured = capsys.readouterr()
    return summary, captured.out + captured.err


def assert_learned(summary, metric, margin):
    """The trained towers beat the same towers untrained on the held-out `metric` by `margin` (a
    loss that gives no gradient leaves the untrained figure), and the loss falls on the user's rows."""
    m = summary["metrics"]
    losses = logged(summary)
    assert losses[-1] < losses[0], losses  # the loss falls on the user's rows
    for which in ("trained", "untrained"):
        assert 0.0 <= m[f"{metric}_{which}"] <= 1.0
    assert m[f"{metric}_trained"] >= m[f"{metric}_untrained"] + margin, (metric, m)
    assert m["skipped_rows"] == 0 and m["anchors_without_positive_total"] == 0


def test_imagefolder_streamed_through_a_file_uri_with_supcon_and_a_corrupt_image(tmp_path, local_ray, capsys):
    """(The cached path's skipped-row count is test_formats.py's; the cached runs are the others here.)"""
    write_imagefolder(tmp_path / "images", 160)
    (tmp_path / "images" / "red" / "corrupt.png").write_bytes(b"\x89PNG broken")
    streamed, out = train(tmp_path, "streamed", ["dataset.format=imagefolder", *SMALL_CNN, *STREAM,
                                                 "dataset.max_skipped_fraction=0.05",
                                                 f"dataset.path=file://{tmp_path}/images", "loss.name=supcon",
                                                 "loss.m=4"], capsys)
    m = streamed["metrics"]
    assert m["anchors_without_positive_total"] == 0  # every streamed batch held m of each of its classes
    with open(os.path.join(streamed["run_dir"], "metrics.csv")) as f:
        positives = [float(row["mean_positives"]) for row in csv.DictReader(f) if row["mean_positives"]]
    assert positives and min(positives) >= 2 * 4 - 1  # both views of the 3 others of its class, and its own
    assert m["skipped_rows"] == 1 and 0 < m["stream_rows"] <= 161  # the corrupt image, counted once per pass
    # SupCon's value moves with how many classes a batch holds, so learning shows in the held-out kNN
    # (measured: 1.0 trained, 0.93 untrained, of 28 held-out images); but colour tells these classes
    # apart (raw pixels score 1.0), so a run with no gradient scores 1.0 as well (measured): the
    # run's figure pinned too, its step-16 loss (3.381; 3.464 with no gradient), the same run after run
    assert m["knn_top1_trained"] >= m["knn_top1_untrained"] and m["knn_top1_trained"] > 0.5, m
    assert logged(streamed)[-1] == pytest.approx(3.3810, abs=1e-3)


def test_a_stream_with_too_many_bad_rows_stops_with_the_reason(tmp_path, local_ray, capsys):
    """The bad rows are met by the workers (the held-out split is clean): the run stops at the end
    of its first epoch, and the driver raises the workers' reason, not a Ray Train failure."""
    write_imagefolder(tmp_path / "train", 48)
    write_imagefolder(tmp_path / "test", 16, start=48)
    for i in range(3):
        (tmp_path / "train" / "red" / f"corrupt{i}.png").write_bytes(b"\x89PNG broken")
    # 50 of the 51 rows: Ray Data splits a stream into equal shards, 25 rows a rank
    with pytest.raises(TooManySkippedRows, match=r"^3 of 50 rows \(6.0%\) .*max_skipped_fraction=0.01; e.g. "
                                                 r"red/corrupt\d.png: ValueError: not an image Pillow can decode"):
        train(tmp_path, "bad", ["dataset.format=imagefolder", *SMALL_CNN, *STREAM, f"dataset.path={tmp_path}/train",
                                f"dataset.eval_path={tmp_path}/test", "train.log_every=1"], capsys, max_steps=1000)
    with open(tmp_path / "runs" / "bad" / "metrics.csv") as f:
        reported = list(csv.DictReader(f))
    assert {r["epoch"] for r in reported} == {"0"} and reported[-1]["step"] == "2"  # 47 good rows: 2 batches of 16


TEXT_ROWS = ["task=text", "dataset.format=jsonl", "dataset.columns.a=anchor", "dataset.columns.b=positive",
             "text.tower.max_length=16"]


def test_jsonl_triplet_rows_train_infonce_with_every_rows_hard_negative(tmp_path, tiny_bert, local_ray, capsys):
    """(anchor, positive, negative) rows, as sentence-transformers trains with hard negatives; with
    a label column, so the held-out texts are also scored by kNN."""
    write_text_rows(tmp_path / "triplets.jsonl", 200, mismatched=False)
    summary, _ = train(tmp_path, "triplets", [*TEXT_ROWS, f"dataset.path={tmp_path}/triplets.jsonl",
                                              "dataset.columns.negative=negative", "dataset.columns.label=label",
                                              f"text.tower.model={tiny_bert}", "loss.name=infonce",
                                              "loss.temperature=0.1"], capsys)
    # measured: recall@1 1.0 trained, 0.88 untrained (50 held-out queries)
    assert_learned(summary, "recall@1", margin=0.06)  # (that every query meets the hard negatives: test_grad_cache, test_losses)
    assert "knn_top1_trained" in summary["metrics"] and "knn_top1_baseline" in summary["metrics"]


def test_pair_labelled_rows_train_the_margin_loss(tmp_path, tiny_bert, local_ray, capsys):
    """(x1, x2, is_same) rows: pulled together where 1, pushed apart where 0; scored on the matching rows."""
    write_text_rows(tmp_path / "pairs.jsonl", 240)
    summary, _ = train(tmp_path, "pairs", [*TEXT_ROWS, f"dataset.path={tmp_path}/pairs.jsonl",
                                             "dataset.columns.is_same=is_same", f"text.tower.model={tiny_bert}",
                                             "loss.name=contrastive", "loss.margin=0.5", "optim.lr=0.003"], capsys)
    losses = logged(summary)
    assert losses[-1] < losses[0], losses
    m = summary["metrics"]
    held_out_matching = round(1 / m["recall@1_baseline"])
    assert 0 < held_out_matching < 0.2 * 240 * 0.9  # a third of the held-out rows do not match: not scored
    assert m["recall@1_trained"] >= m["recall@1_untrained"] + 0.04, m  # measured: 1.0 and 0.85 (34 and 29 of 34)


def test_hf_clip_fine_tunes_on_labelled_csv_rows_with_zero_shot_and_exports(tmp_path, tiny_clip, local_ray, capsys):
    """A pretrained CLIP (transformers) on csv rows held in memory, with gradient caching; labelled,
    so zero-shot classification is scored. (Parquet rows decode to the same table: test_formats.py.)"""
    from transformers import CLIPModel

    write_csv(tmp_path / "csv" / "train.csv", 160)
    summary, _ = train(tmp_path, "csv", ["task=image_text", "image_text.towers=hf_clip", f"image_text.pretrained={tiny_clip}",
                                         "loss.name=clip", "dataset.format=csv", f"dataset.path={tmp_path}/csv/train.csv",
                                         "dataset.columns.a=filepath", "dataset.columns.b=title",
                                         "dataset.columns.label=label", "dataset.image_size=32", "optim.lr=0.001",
                                         "train.grad_cache_chunk=4"], capsys)
    assert_learned(summary, "i2t_recall@5", margin=0.2)  # measured: 0.74 trained, 0.30 untrained (23 held-out rows)
    m = summary["metrics"]
    assert m["t2i_recall@5_trained"] >= m["t2i_recall@5_untrained"] + 0.2, m  # measured: 0.70 and 0.22
    temperatures = logged(summary, "temperature")
    assert temperatures[0] == pytest.approx(0.07, rel=0.05) and temperatures[-1] != temperatures[0]  # CLIP's own scale, trained
    assert m["zeroshot_top1_baseline"] == pytest.approx(0.25, abs=0.15)  # 4 classes
    assert 0 <= m["zeroshot_top1_untrained"] <= 1
    assert m["zeroshot_top1_trained"] >= m["zeroshot_top1_untrained"] + 0.1, m  # measured: 0.91 and 0.70
    assert {os.path.basename(p) for p in summary["exported"]} >= {"hf_clip", "towers.pt"}
    exported = CLIPModel.from_pretrained(os.path.join(summary["run_dir"], "hf_clip"))
    assert exported.logit_scale.item() == pytest.approx(-math.log(temperatures[-1]), rel=0.05)


def batch_log(directory) -> dict:
    """(epoch, batch) -> the rows each rank trained on, from the last attempt that logged it."""
    logged = defaultdict(dict)
    for rank in (0, 1):
        with open(os.path.join(directory, f"rank{rank}.jsonl")) as f:
            for line in f:
                entry = json.loads(line)
                logged[(entry["epoch"], entry["batch"])].setdefault(rank, []).append(entry["rows"])
    return logged


@contextmanager
def a_worker_killed(run_dir):
    """One of the run's Ray Train workers SIGKILLed, while the block runs the run, once the
    controller has registered a checkpoint in `run_dir` (Ray Train restarts the group from it)."""
    snapshot, killed = Path(run_dir) / "checkpoint_manager_snapshot.json", []

    def kill_after_the_first_checkpoint():
        deadline = time.time() + 240
        while not snapshot.exists() and time.time() < deadline:
            time.sleep(0.2)
        # this process's local Ray, and so its workers, run in the suite's own RAY_TMPDIR
        workers = train_worker_pids(f"RAY_TMPDIR={os.environ['RAY_TMPDIR']}")
        if snapshot.exists() and workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    killer = threading.Thread(target=kill_after_the_first_checkpoint, daemon=True)
    killer.start()
    yield
    killer.join()
    assert killed, "no worker was killed: no checkpoint registered, or no Ray Train worker found"


def train_killing_a_worker(tmp_path, name, overrides, capsys, max_steps):
    """`train`, with one of the run's workers killed after its first checkpoint; the summary and the console."""
    with a_worker_killed(tmp_path / "runs" / name):
        return train(tmp_path, name, overrides, capsys, max_steps=max_steps)


def test_killed_worker_resumes_a_webdataset_stream_mid_epoch(tmp_path, tiny_bert, local_ray, capsys):
    write_shards(tmp_path / "wds", 240, 30)
    log = tmp_path / "batches"
    # SigLIP with neighbour exchange: the texts pass between the two workers by point-to-point sends
    overrides = [*IMAGE_TEXT, *STREAM, f"image_text.text_tower.model={tiny_bert}", "loss.name=siglip",
                 "loss.neighbour_exchange=true",
                 "dataset.format=webdataset", f"dataset.path={tmp_path}/wds/train-{{000000..000007}}.tar",
                 "dataset.columns.a=jpg;png", f"train.batch_log={log}", "dataset.shuffle_buffer=32"]
    # 16 steps: the first epoch (12 batches), killed after its 8th, and 4 batches of the next
    summary, out = train_killing_a_worker(tmp_path, "kill", overrides, capsys, max_steps=16)
    m = summary["metrics"]
    assert m["step"] == 16 and 8 <= m["start_step"] < 16, out
    # 16 steps teach nothing the 41 held-out rows show (measured, dropout on from the first step:
    # i2t recall@5 0.146 trained, 0.122 untrained): the figures pinned, as an uninterrupted run and every resumed one measure them
    assert [m[f"{k}_trained"] for k in ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5")] == [
        pytest.approx(1 / 41, abs=1e-6), pytest.approx(6 / 41, abs=1e-6), pytest.approx(1 / 41, abs=1e-6),
        pytest.approx(6 / 41, abs=1e-6)], m
    with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f) if row["loss"]]
    assert losses[-1] == pytest.approx(3.3276, abs=1e-3), losses  # step 16's
    logged = batch_log(log)
    epoch0 = sorted(b for (e, b) in logged if e == 0)
    assert epoch0 == list(range(len(epoch0))) and len(epoch0) >= 8
    rows = []
    for batch in epoch0:
        for rank in (0, 1):
            attempts = logged[(0, batch)][rank]
            assert all(a == attempts[0] for a in attempts)  # a re-run batch holds the same rows
            assert len(attempts[0]) == 8  # the same shape on every rank
            rows += attempts[0]
    assert len(rows) == len(set(rows))  # no row of the epoch repeated, before or after the restart
    keys = np.array([f"train-{i // 30:06d}.tar/{i:06d}" for i in range(240)], dtype=object)
    train_rows = int((~held_out(keys, 0, 0.2)).sum())
    assert train_rows - 16 < len(rows) <= train_rows  # none skipped: short of the epoch by less than a global batch
    assert any(len(logged[(0, b)][0]) > 1 for b in epoch0)  # some batches were trained twice: the resume


def test_dataset_errors_exit_2_before_ray_starts(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", 40)
    proc = subprocess.run(command(tmp_path, "bad", ["task=text", "dataset.format=jsonl",
                                                    f"dataset.path={tmp_path}/pairs.jsonl", "dataset.columns.a=query",
                                                    "dataset.columns.b=positive"]),
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: dataset.columns.a: column 'query' is not in" in proc.stderr
    assert "anchor, positive, caption, label" in proc.stderr and "Started a local Ray" not in proc.stderr


def test_an_elastic_stream_whose_parts_cannot_hold_groups_of_m_is_refused_before_training(tmp_path, local_ray):
    """An elastic range splits a stream into as many parts as its most workers: a part's rows of a
    global batch (12 / 2) must hold whole groups of m."""
    from distributed_cl import trainer

    write_imagefolder(tmp_path / "images", 40)
    config = Config.load(None, ["dataset.format=imagefolder", f"dataset.path={tmp_path}/images", *SMALL_CNN, *STREAM,
                                "loss.name=supcon", "loss.m=4", "train.num_workers=[1, 2]", "train.global_batch_size=12",
                                "train.max_steps=2", f"train.storage_path={tmp_path}/runs"])
    with pytest.raises(ConfigError, match=r"loss.m=4: each of the stream's 2 parts gives 6 rows to a global batch, "
                                          r"not a multiple of m .*a multiple of 8"):
        trainer.run(config, console=False)


@pytest.mark.parametrize("example", ["custom_images", "custom_text_pairs", "custom_image_text"])
def test_example_configs_point_at_the_documented_example_data(example):
    import yaml

    raw = yaml.safe_load((ROOT / "experiments" / f"{example}.yaml").read_text())
    assert raw["dataset"]["path"].startswith("data/examples/")
    assert raw["dataset"]["format"] == {"custom_images": "imagefolder", "custom_text_pairs": "jsonl",
                                        "custom_image_text": "webdataset"}[example]


def write_source(path, kind: str, n: int):
    """Pairs of one kind: `qa` (a question about a numbered colour and its answer) or `fruit`."""
    things = ["apple", "pear", "plum", "fig", "lime", "kiwi", "date", "grape"]
    with open(path, "w") as f:
        for i in range(n):
            if kind == "qa":
                row = {"q": f"question {i} about {things[i % 8]} colour", "a": f"answer {i} is colour {i % 8}"}
            else:
                row = {"q": f"a basket of {i} {things[i % 8]}s", "a": f"there are {i} {things[i % 8]}s here"}
            f.write(json.dumps(row) + "\n")
    return path


def test_two_sources_give_each_global_batch_from_one_by_weight_and_resume_mid_epoch(tmp_path, tiny_bert, local_ray,
                                                                                     capsys):
    """dataset.sources: two streamed jsonl sources, weights 3 and 1. Every global batch holds rows of
    one source only, the sources follow the seeded schedule, each restarts its own epochs, the run
    counts its batches per source and scores each source's held-out rows; a killed worker resumes
    every source where it stood."""
    from distributed_cl.data.sources import source_of_step
    from distributed_cl.data.table import Table

    rows = {kind: [json.loads(line) for line in write_source(tmp_path / f"{kind}.jsonl", kind, n).read_text().splitlines()]
            for kind, n in (("qa", 120), ("fruit", 96))}
    digests = {kind: set(Table([r["q"] for r in rs], [r["a"] for r in rs]).digests()) for kind, rs in rows.items()}
    log = tmp_path / "batches"
    sources = [{"name": kind, "format": "jsonl", "path": str(tmp_path / f"{kind}.jsonl"), "columns": {"a": "q", "b": "a"},
                "weight": weight, "cache": False, "shuffle_buffer": 16, "eval_fraction": 0.2, "decode_cpus": 0.5}
               for kind, weight in (("qa", 3), ("fruit", 1))]
    overrides = ["task=text", f"text.tower.model={tiny_bert}", "text.tower.max_length=16", "loss.name=infonce",
                 "loss.temperature=0.1", "train.cpus_per_worker=0.5", f"train.batch_log={log}",
                 f"dataset={json.dumps({'sources': sources})}"]
    steps = 20
    summary, out = train_killing_a_worker(tmp_path, "sources", overrides, capsys, max_steps=steps)
    m = summary["metrics"]
    assert m["step"] == steps and 8 <= m["start_step"] < steps, out

    schedule = [["qa", "fruit"][source_of_step(np.array([3.0, 1.0]), 0, s)] for s in range(steps)]
    assert (m["batches_qa"], m["batches_fruit"]) == (schedule.count("qa"), schedule.count("fruit"))
    assert 0 < m["batches_fruit"] < m["batches_qa"]

    logged = defaultdict(lambda: defaultdict(list))  # (source, epoch, batch) -> rank -> each attempt's rows
    for rank in (0, 1):
        with open(log / f"rank{rank}.jsonl") as f:
            for line in f:
                entry = json.loads(line)
                logged[(entry["source"], entry["epoch"], entry["batch"])][rank].append(entry["rows"])
    for (source, epoch, batch), by_rank in logged.items():
        for attempts in by_rank.values():
            assert all(a == attempts[0] for a in attempts)  # a batch trained again holds the same rows
            assert set(attempts[0]) <= digests[source], (source, epoch, batch)  # one source's rows only
        assert len(by_rank) == 2 and all(len(a[0]) == 8 for a in by_rank.values())
    for source in ("qa", "fruit"):
        keys = sorted(k[1:] for k in logged if k[0] == source)
        assert len(keys) == m[f"batches_{source}"]  # every batch of the source once, after the resume too
        epoch0 = [k for k in keys if k[0] == 0]
        seen = [row for k in epoch0 for rank in (0, 1) for row in logged[(source, *k)][rank][0]]
        assert len(seen) == len(set(seen))  # no row of the source's epoch repeated
    assert max(k[1] for k in logged if k[0] == "qa") >= 1  # qa ran out and restarted its own epoch
    assert any(len(a) > 1 for by_rank in logged.values() for a in by_rank.values())  # the resume re-ran batches

    for source in ("qa", "fruit"):  # each source's held-out rows, scored on their own
        assert {f"{source}_recall@1_trained", f"{source}_recall@1_untrained"} <= set(m)
    # measured: qa 1.0 trained against 0.316 untrained, fruit 0.95 against 0.70
    assert m["qa_recall@1_trained"] > m["qa_recall@1_untrained"] + 0.3, m
    assert m["fruit_recall@1_trained"] > m["fruit_recall@1_untrained"] + 0.1, m
