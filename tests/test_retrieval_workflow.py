"""The retrieval workflow around training, end to end on one trained text run: BEIR figures during
training and from `train.py evaluate` (against sentence-transformers' evaluator), `train.py embed`
on a pool of replicas (against one process and the SentenceTransformer export), `train.py mine`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from model_cards import check_model_card

import train as train_cli
from distributed_cl import trainer
from distributed_cl.config import Config
from distributed_cl.embedding import read_embeddings
from distributed_cl.tasks import TASKS, load_towers

pytestmark = pytest.mark.xdist_group("ray")  # a local Ray and Ray Train (conftest.py)

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def write_pairs(path: Path, n: int) -> Path:
    """Rows (id, anchor, positive): a question about a numbered colour and its answer; row 7 has an
    empty anchor (skipped and counted)."""
    with path.open("w") as f:
        for i in range(n):
            colour = COLOURS[i % len(COLOURS)]
            anchor = "" if i == 7 else f"question {i} about {colour}"
            f.write(json.dumps({"id": f"r{i:04d}", "anchor": anchor, "positive": f"answer {i} is {colour}"}) + "\n")
    return path


def write_beir(directory: Path, documents: int = 140, queries: int = 24) -> Path:
    """A BEIR directory: documents answer numbered colour questions; every fourth query has two
    relevant documents (one with score 2), one judgement is not relevant (score 0)."""
    (directory / "qrels").mkdir(parents=True)
    with (directory / "corpus.jsonl").open("w") as f:
        for i in range(documents):
            f.write(json.dumps({"_id": f"d{i}", "title": f"note {i}", "text": f"answer {i} is {COLOURS[i % 8]}"}) + "\n")
    with (directory / "queries.jsonl").open("w") as f:
        for i in range(queries):
            f.write(json.dumps({"_id": f"q{i}", "text": f"question {i} about {COLOURS[i % 8]}"}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"]
    for i in range(queries):
        lines.append(f"q{i}\td{i}\t1")
        if i % 4 == 0:
            lines.append(f"q{i}\td{i + 100}\t2")
    lines.append("q1\td3\t0")
    (directory / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return directory


def config_file(tmp_path: Path, tiny_bert: str, rows: Path, beir: Path | None = None) -> Path:
    dataset = {"format": "jsonl", "path": str(rows), "columns": {"a": "anchor", "b": "positive"}, "eval_fraction": 0.1}
    if beir is not None:
        dataset["eval_beir"] = str(beir)
    config = {"task": "text", "text": {"tower": {"model": tiny_bert, "max_length": 16}}, "dataset": dataset,
              "loss": {"name": "infonce", "temperature": 0.1}, "optim": {"lr": 0.003, "warmup_steps": 2},
              "train": {"num_workers": 2, "global_batch_size": 32, "max_steps": 16, "log_every": 8,
                        "checkpoint_every": 100, "storage_path": str(tmp_path / "runs"), "name": "pairs"}}
    path = tmp_path / "pairs.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert, local_ray):
    """One text run on pairs, scored on a BEIR directory at each evaluation."""
    tmp_path = tmp_path_factory.mktemp("retrieval")
    rows = write_pairs(tmp_path / "pairs.jsonl", 240)
    beir = write_beir(tmp_path / "beir")
    config = config_file(tmp_path, tiny_bert, rows, beir)
    summary = trainer.run(Config.load(config))
    return {"tmp": tmp_path, "rows": rows, "beir": beir, "config": config, "summary": summary,
            "run_dir": summary["run_dir"]}


BEIR_KEYS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")


def st_figures(model, beir: Path) -> dict[str, float]:
    """sentence-transformers' InformationRetrievalEvaluator on the benchmark, with `model`."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    read = lambda name: [json.loads(line) for line in (beir / name).read_text().splitlines()]  # noqa: E731
    corpus = {r["_id"]: f"{r['title']} {r['text']}".strip() for r in read("corpus.jsonl")}
    queries = {r["_id"]: r["text"] for r in read("queries.jsonl")}
    relevant: dict[str, set[str]] = {}
    for line in (beir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, score = line.split("\t")
        if int(score) > 0:
            relevant.setdefault(q, set()).add(d)
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, mrr_at_k=[10], ndcg_at_k=[10],
                                              accuracy_at_k=[1], precision_recall_at_k=[10, 100], map_at_k=[100],
                                              show_progress_bar=False, batch_size=64, write_csv=False)
    scores = evaluator(model)  # {"cosine_ndcg@10": ..., ...}
    return {key: scores[f"cosine_{key}"] for key in BEIR_KEYS}


def test_training_scores_the_benchmark_and_evaluate_gives_sentence_transformers_figures(run, tmp_path, capsys):
    m = run["summary"]["metrics"]
    for key in BEIR_KEYS:
        assert {f"beir_{key}_trained", f"beir_{key}_untrained"} <= set(m), m
    # the trained towers retrieve the answers better than the untrained ones (measured: ndcg@10 0.903 vs 0.783)
    assert m["beir_ndcg@10_trained"] > m["beir_ndcg@10_untrained"] + 0.05, m

    out = tmp_path / "eval.json"
    assert train_cli.main(["evaluate", "--run", run["run_dir"], "--beir", str(run["beir"]), "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["queries"] == 24 and result["corpus"] == 140
    figures = result["metrics"]
    assert figures == {key: pytest.approx(m[f"beir_{key}_trained"], abs=1e-6) for key in BEIR_KEYS}
    table = capsys.readouterr().out
    assert "ndcg@10" in table and f"{figures['ndcg@10']:.4f}" in table

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(Path(run["run_dir"]) / "sentence_transformer"), device="cpu")
    assert figures == {key: pytest.approx(value, abs=1e-4) for key, value in st_figures(model, run["beir"]).items()}

    # the untrained towers of the config: the run's own untrained figures
    assert train_cli.main(["evaluate", "--config", str(run["config"]), "--beir", str(run["beir"]),
                           "--output-json", str(out)]) == 0
    untrained = json.loads(out.read_text())["metrics"]
    assert untrained == {key: pytest.approx(m[f"beir_{key}_untrained"], abs=1e-6) for key in BEIR_KEYS}


def test_embed_on_two_replicas_equals_one_process_and_the_sentence_transformer(run, tmp_path):
    out = tmp_path / "embedded"
    assert train_cli.main(["embed", "--run", run["run_dir"], "--config", str(run["config"]), "--side", "a",
                           "--output", str(out), "--num-workers", "2", "--batch-size", "32", "--shard-rows", "100"]) == 0
    summary = json.loads((out / "embeddings.json").read_text())
    assert (summary["rows"], summary["embedded"], summary["skipped"], summary["ids"]) == (240, 239, 1, "id")
    assert len(summary["files"]) == 3 and pq.read_table(out / summary["files"][0]).num_rows == 100
    ids, z = read_embeddings(str(out))
    rows = [json.loads(line) for line in run["rows"].read_text().splitlines()]
    good = [r for r in rows if r["anchor"]]
    assert ids.tolist() == [r["id"] for r in good]  # every good row once, in the input's order

    towers = load_towers(str(Path(run["run_dir"]) / "towers.pt"))  # one process: as the run's evaluation embeds
    with torch.no_grad():
        expected = TASKS["text"].encode(towers, "a", [r["anchor"] for r in good], towers.tokenize, torch.device("cpu"))
    assert np.allclose(z, expected.numpy(), atol=1e-5)

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(Path(run["run_dir"]) / "sentence_transformer"), device="cpu")
    # its model card: every held-out figure of the final table, and a snippet that loads it as written
    m = run["summary"]["metrics"]
    names = [k.removesuffix("_trained") for k in m if k.endswith("_trained")]
    figures = {n: (m[f"{n}_trained"], m.get(f"{n}_untrained"), m.get(f"{n}_baseline")) for n in names}
    made = check_model_card(Path(run["run_dir"]) / "sentence_transformer", "sentence-transformers",
                            Config.load(run["config"]).text.tower.model, figures)
    assert made["embeddings"] == pytest.approx(model.encode(["A first sentence.", "Another one."]), abs=1e-5)
    st = model.encode([r["anchor"] for r in good], convert_to_tensor=True)
    assert F.cosine_similarity(st, torch.from_numpy(z)).min() >= 0.9999


def test_mine_writes_rows_with_hard_negatives_within_the_rules(run, tmp_path):
    out = tmp_path / "mined.jsonl"
    args = ["mine", "--config", str(run["config"]), "--run", run["run_dir"], "--output", str(out), "--num-negatives",
            "2", "--range-max", "10", "--relative-margin", "0.05", "--num-workers", "2"]
    assert train_cli.main([*args, "--output-json", str(tmp_path / "mine.json")]) == 0
    summary = json.loads((tmp_path / "mine.json").read_text())
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == 240 and summary["skipped"] == 1 and len(mined) == summary["written"] > 200
    assert list(mined[0]) == ["id", "anchor", "positive", "negative_1", "negative_2"]

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(Path(run["run_dir"]) / "sentence_transformer"), device="cpu")
    rows = [json.loads(line) for line in run["rows"].read_text().splitlines()]
    positives = [r["positive"] for r in rows if r["anchor"]]
    pool = model.encode(positives, convert_to_tensor=True, normalize_embeddings=True)
    for row in mined:
        a, p = model.encode([row["anchor"], row["positive"]], convert_to_tensor=True, normalize_embeddings=True)
        scores = pool @ a
        top = {positives[i] for i in scores.topk(11).indices.tolist()}  # ranks 0..10
        positive_score = float(a @ p)
        for negative in (row["negative_1"], row["negative_2"]):
            assert negative != row["positive"] and negative in top, row
            assert float(model.encode(negative, convert_to_tensor=True, normalize_embeddings=True) @ a) \
                <= positive_score * 0.95 + 1e-4, row
        assert row["negative_1"] != row["negative_2"]
    # the same seed mines the same rows; parquet keeps the columns
    again = tmp_path / "again.parquet"
    assert train_cli.main([*args[:5], "--output", str(again), *args[7:]]) == 0
    assert pq.read_table(again).to_pylist() == mined

    # the mined rows train, streamed through Ray Data, with both negatives a row in every batch
    config = Config.load(run["config"], [f"dataset.path={out}", "dataset.columns.negative=[negative_1,negative_2]",
                                         "dataset.cache_limit_mb=0", "train.cpus_per_worker=0.5", "train.name=mined"])
    m = trainer.run(config)["metrics"]
    assert m["beir_ndcg@10_trained"] > m["beir_ndcg@10_untrained"] + 0.05, m  # measured: 0.903 against 0.783


def test_bad_benchmarks_and_mining_options_are_refused_before_ray_starts(tmp_path, tiny_bert, capsys):
    beir = write_beir(tmp_path / "beir")
    with (beir / "qrels" / "test.tsv").open("a") as f:
        f.write("q2\td999\t1\n")
    rows = write_pairs(tmp_path / "pairs.jsonl", 40)
    config = config_file(tmp_path, tiny_bert, rows)
    assert train_cli.main(["evaluate", "--config", str(config), "--beir", str(beir)]) == 2
    assert "line 33 names document 'd999', not in corpus.jsonl" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "corpus.jsonl").write_text("")
    assert train_cli.main(["evaluate", "--config", str(config), "--beir", str(tmp_path / "empty")]) == 2
    assert "corpus.jsonl is empty" in capsys.readouterr().err
    assert train_cli.main(["--config", str(config), "--set", f"dataset.eval_beir={beir}"]) == 2
    assert "dataset.eval_beir" in capsys.readouterr().err
    assert train_cli.main(["mine", "--config", str(config), "--output", str(tmp_path / "m.jsonl"),
                           "--relative-margin", "1.5"]) == 2
    assert "relative_margin" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse's refusal: status 2
        train_cli.main(["embed", "--config", str(config), "--output", str(tmp_path / "e"), "--num-workers", "0"])
    assert refused.value.code == 2
    assert "--num-workers" in capsys.readouterr().err
    assert train_cli.main(["--config", str(config), "--set", "dataset.columns.negative=[negative_1,negative_2]"]) == 2
    assert "negative_1" in capsys.readouterr().err


def write_image_beir(directory: Path, size: int = 32) -> tuple[Path, list[str], list[np.ndarray]]:
    """A BEIR directory whose corpus is images: noisy squares of eight colours, as files relative to
    the directory, as absolute paths and as base64 bytes, one of them not an image (skipped); the
    queries name a colour, every document of that colour relevant. Also the documents' ids and
    their images decoded as the reference decodes them (None: the broken one)."""
    import base64
    import io

    from PIL import Image

    from distributed_cl.data.formats import decode_image

    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 30, 160), "orange": (250, 140, 20)}
    (directory / "images").mkdir(parents=True)
    (directory / "qrels").mkdir()
    g = np.random.default_rng(0)
    ids, images, lines, qrels = [], [], [], ["query-id\tcorpus-id\tscore"]
    for i in range(40):
        colour = COLOURS[i % 8]
        pixels = np.clip(np.array(rgb[colour]) + g.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        data = buffer.getvalue()
        doc = f"img{i:02d}"
        if i == 13:
            row, data = {"_id": doc, "image_bytes": base64.b64encode(b"not a png").decode()}, None
        elif i % 3 == 0:
            row = {"_id": doc, "image_bytes": base64.b64encode(data).decode()}
        else:
            (directory / "images" / f"{doc}.png").write_bytes(data)
            path = directory / "images" / f"{doc}.png"
            row = {"_id": doc, "image": str(path) if i % 3 == 1 else f"images/{doc}.png"}
        lines.append(json.dumps(row))
        ids.append(doc)
        images.append(None if data is None else decode_image(data, size))
        if data is not None:
            qrels.append(f"q{i % 8}\t{doc}\t1")
    (directory / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{k}", "text": f"a photo of {colour}"}) + "\n"
                                                     for k, colour in enumerate(COLOURS)))
    (directory / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return directory, ids, images


def test_image_corpus_evaluate_and_image_embed_equal_the_towers_in_one_process(tmp_path, local_ray):
    """Image-text towers (the config's, untrained): `evaluate` on a BEIR corpus of images and `embed`
    of a parquet image column give what the towers compute in this process on the same images."""
    import base64

    import pyarrow as pa

    from distributed_cl.retrieval import ir_metrics

    beir, ids, images = write_image_beir(tmp_path / "beir")
    good = [i for i, image in enumerate(images) if image is not None]
    pq.write_table(pa.table({"id": [ids[i] for i in good], "caption": [f"image {i}" for i in good],
                             "image": [base64.b64decode(json.loads(line).get("image_bytes", ""))
                                       or (beir / "images" / f"{ids[i]}.png").read_bytes()
                                       for i, line in enumerate((beir / "corpus.jsonl").read_text().splitlines())
                                       if i in good]}), tmp_path / "images.parquet")
    path = tmp_path / "clip.yaml"
    path.write_text(json.dumps({"task": "image_text", "dataset": {
        "format": "parquet", "path": str(tmp_path / "images.parquet"), "image_size": 32,
        "columns": {"a": "image", "b": "caption"}, "eval_fraction": 0.1}, "train": {"global_batch_size": 8}}))

    out = tmp_path / "eval.json"
    assert train_cli.main(["evaluate", "--config", str(path), "--beir", str(beir), "--output-json", str(out),
                           "--batch-size", "8"]) == 0
    result = json.loads(out.read_text())
    assert (result["corpus"], result["skipped_documents"]) == (40, 1) and "img13" in result["skipped_examples"][0]

    config = Config.load(path)
    task = TASKS["image_text"]
    torch.manual_seed(config.train.seed)
    towers = task.build_towers(config).eval()
    with torch.no_grad():
        z_images = task.encode(towers, "a", torch.from_numpy(np.stack([images[i] for i in good])), None, "cpu")
        z_texts = task.encode(towers, "b", [f"a photo of {c}" for c in COLOURS], task.tokenizer(config), "cpu")
    scores = (F.normalize(z_texts, dim=1) @ F.normalize(z_images, dim=1).T).tolist()
    ranked = torch.tensor([[good[j] for j in sorted(range(len(good)), key=lambda j, s=s: (-s[j], ids[good[j]]))]
                           for s in scores])
    relevant = [{i for i in good if i % 8 == k} for k in range(8)]
    assert result["metrics"] == pytest.approx(ir_metrics(ranked, relevant), abs=1e-6)

    embedded = tmp_path / "embedded"
    assert train_cli.main(["embed", "--config", str(path), "--output", str(embedded), "--side", "a",
                           "--num-workers", "2", "--batch-size", "8"]) == 0
    got_ids, z = read_embeddings(str(embedded))
    assert got_ids.tolist() == [ids[i] for i in good]
    assert np.allclose(z, z_images.numpy(), atol=1e-5)
