"""Searching a corpus with towers: `train.py evaluate` (BEIR figures) and `train.py mine` (hard negatives).

Both embed through embedding.py's pool and search exactly as the embeddings arrive (retrieval.TopK):
the driver holds the queries' (anchors') embeddings and the running top k, never a corpus-sized
score matrix.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np
import ray
import torch

from distributed_cl.config import ConfigError
from distributed_cl.data.beir import CORPUS, Beir, decode_corpus_batch
from distributed_cl.data.formats import DatasetOptions
from distributed_cl.embedding import Embedded, Pool, TowersSource, dataset_rows, ordered, read_back
from distributed_cl.retrieval import BEIR_METRICS, RANKED, TopK, id_order, ir_metrics, search, select_negatives


def texts_dataset(ids: list[str], texts: list[str]) -> ray.data.Dataset:
    """In-memory texts as the pool's input rows."""
    return ray.data.from_items([{"id": i, "a": t, "error": "" if t.strip() else "empty text"} for i, t in zip(ids, texts)])


def embed_all(rows: ray.data.Dataset, source: TowersSource, side: str, pool: Pool) -> tuple[torch.Tensor, list[str]]:
    """Every row's embedding, in order, in memory (queries, anchors); the bad rows' reasons."""
    parts, errors = [], []
    for part in read_back(pool.embed(rows, source, side), ids_are_positions=True):
        parts.append(part)
        errors += part.errors
    z = np.concatenate([p.embeddings for p in parts if len(p.ids)]) if any(len(p.ids) for p in parts) else np.zeros((0, 0))
    return torch.from_numpy(z), errors


def search_stream(queries: torch.Tensor, stream, k: int, expected_ids: list[str] | None = None) -> tuple[TopK, int, list[str]]:
    """The running exact top k of `queries` over an embedded stream, fed in contiguous runs of good
    rows (a bad row keeps its position and is never ranked); the rows seen and the bad rows' reasons."""
    top = TopK(queries, k)
    order = None if expected_ids is None else id_order(expected_ids)  # equal scores: by id, as the evaluator
    seen, errors = 0, []
    for part in stream:
        part: Embedded
        if expected_ids is not None:  # the order the judgements were numbered in
            got = [str(i) for i in part.ids]
            want = [expected_ids[p] for p in part.positions]
            if got != want:
                raise RuntimeError(f"corpus rows came out of order at position {part.positions[:1]}")
        for run in _contiguous(part.positions):
            start = int(part.positions[run][0])
            top.add(torch.from_numpy(part.embeddings[run]), start,
                    None if order is None else order[start : start + len(part.positions[run])])
        seen = int(part.positions[-1]) + 1 if len(part.positions) else seen
        errors += part.errors
    return top, seen, errors


def _contiguous(positions: np.ndarray) -> list[slice]:
    """Slices of `positions` (increasing) that are runs of consecutive integers."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    edges = [0, *breaks.tolist(), len(positions)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


# ----------------------------------------------------------------------------- train.py evaluate


def corpus_rows(beir: Beir, image_size: int) -> ray.data.Dataset:
    """The corpus, read and decoded in Ray Data tasks ({"id", "a", "error"})."""
    raw = ray.data.read_json(os.path.join(beir.directory, CORPUS))
    decode = functools.partial(decode_corpus_batch, directory=beir.directory, kind=beir.corpus_kind, image_size=image_size)
    return raw.map_batches(decode, batch_format="numpy", batch_size=256)


def evaluate_on_beir(source: TowersSource, beir: Beir, pool: Pool, verbose: bool = False) -> dict[str, Any]:
    """The towers' BEIR figures on a benchmark (`load_beir`'s): queries embedded by their text
    side, the corpus by the side of its kind, ranked by cosine similarity."""
    task = source.task()
    try:
        query_side, corpus_side = task.side_for("text", "a"), task.side_for(beir.corpus_kind, "b")
    except ValueError as e:
        raise ConfigError(f"--beir: {e}") from None
    ordered(verbose)
    start = time.time()
    queries, bad = embed_all(texts_dataset(beir.query_ids, beir.queries), source, query_side, pool)
    if bad:
        raise ConfigError(f"beir: {len(bad)} queries have an empty text, e.g. {bad[0]}")
    corpus = read_back(pool.embed(corpus_rows(beir, source.image_size()), source, corpus_side), ids_are_positions=False)
    top, seen, skipped = search_stream(queries, corpus, RANKED, beir.corpus_ids)
    if seen != len(beir.corpus_ids):
        raise RuntimeError(f"beir: read {seen} corpus rows of {len(beir.corpus_ids)}")
    _, ranked = top.result()
    metrics = ir_metrics(ranked, beir.relevant)
    return {"metrics": metrics, "queries": len(beir), "corpus": len(beir.corpus_ids), "skipped_documents": len(skipped),
            "skipped_examples": skipped[:5], "seconds": round(time.time() - start, 3)}


def beir_table(metrics: dict[str, float], title: str) -> str:
    return "\n".join([f"{title:<20}{'':>4}", *(f"{name:<20}{metrics[name]:>12.4f}" for name in BEIR_METRICS)])


# ----------------------------------------------------------------------------- train.py mine


def raw_table(dataset: DatasetOptions):
    """Every row of `dataset.path` as it is (all its columns), in order: what `mine` writes back."""
    import pyarrow as pa

    if dataset.kind != "column":
        raise ConfigError(f"dataset.format: mine reads rows of anchor and positive columns (csv, jsonl, parquet, ...), "
                          f"not {dataset.format}")
    fs, files, _ = dataset.listing()
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
              for b in dataset.read(fs, files, None).iter_batches(batch_format="pyarrow", batch_size=None)]
    table = pa.concat_tables(tables, promote_options="default")
    return table.drop_columns([c for c in ("path",) if c in table.column_names])


def embedded_side(dataset: DatasetOptions, source: TowersSource, side: str, pool: Pool, rows: int,
                  seed: int, verbose: bool) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """One side of every row embedded: (embeddings (rows, d), which rows are good, bad rows' reasons)."""
    decoded, _ = dataset_rows(dataset, source.task(), side, seed, verbose)
    z, good, errors = None, np.zeros(rows, bool), []
    for part in read_back(pool.embed(decoded, source, side, dataset.decode_cpus), ids_are_positions=True):
        errors += part.errors
        if len(part.positions):
            z = np.zeros((rows, part.embeddings.shape[1]), np.float32) if z is None else z
            z[part.positions], good[part.positions] = part.embeddings, True
    if z is None:
        raise ConfigError(f"dataset: no row of side {side} decoded, e.g. {'; '.join(errors[:3])}")
    return torch.from_numpy(z), good, errors


def mine(source: TowersSource, dataset: DatasetOptions, output: str, pool: Pool, num_negatives: int = 3,
         range_min: int = 0, range_max: int = 50, relative_margin: float | None = None,
         absolute_margin: float | None = None, corpus: list[str] | None = None, use_faiss: bool = False,
         seed: int = 0, verbose: bool = False) -> dict[str, Any]:
    """Hard negatives for every (anchor, positive) row: the anchors' nearest candidates (the rows'
    positives, or `corpus` texts) ranked range_min..range_max, less the row's own positive, any
    candidate with the positive's or the anchor's text, and the false negatives the margins catch;
    `num_negatives` of them drawn with `seed`. Writes `output` (jsonl, csv or parquet) with the
    input's columns and negative_1..negative_N; rows without enough negatives are left out, counted."""
    import pyarrow as pa

    task = source.task()
    if task.sides[1] != "text":
        raise ConfigError(f"mine finds text negatives for side b; the {task.name} task's side b is not text")
    ordered(verbose)
    start = time.time()
    table = raw_table(dataset)
    columns = dataset.side_columns(task.sides)
    anchors_text = [str(v) for v in table.column(columns["a"]).to_pylist()] if task.sides[0] == "text" else None
    positives_text = [str(v).strip() for v in table.column(columns["b"]).to_pylist()]
    n = len(table)
    anchors, good_a, bad_a = embedded_side(dataset, source, "a", pool, n, seed, verbose)
    positives, good_b, bad_b = embedded_side(dataset, source, "b", pool, n, seed, verbose)
    good = good_a & good_b
    if corpus is None:  # the rows' own positives are the pool (ST's default)
        pool_z, pool_text, pool_rows = positives[good], [positives_text[i] for i in np.flatnonzero(good)], np.flatnonzero(good)
    else:
        pool_z, bad = embed_all(texts_dataset([str(i) for i in range(len(corpus))], corpus), source, "b", pool)
        if bad:
            raise ConfigError(f"--corpus: {len(bad)} texts are empty, e.g. {bad[0]}")
        pool_text, pool_rows = [t.strip() for t in corpus], None
    rows = np.flatnonzero(good)
    q = anchors[rows]
    k = min(range_max, len(pool_z))
    if use_faiss:
        scores, indices = search(q, pool_z, k, use_faiss=True)
    else:
        top = TopK(q, k)
        for offset in range(0, len(pool_z), 65536):  # as a stream would bring them
            top.add(pool_z[offset : offset + 65536], offset)
        scores, indices = top.result()
    positive_scores = torch.nn.functional.cosine_similarity(q.float(), positives[rows].float(), dim=1)
    # ruled out: the row's own positive, and any candidate with its positive's (or anchor's) text
    text_id: dict[str, int] = {}
    number = lambda texts: torch.tensor([text_id.setdefault(t, len(text_id)) for t in texts])  # noqa: E731
    candidate = number(pool_text)[indices]
    excluded = candidate == number([positives_text[i] for i in rows])[:, None]
    if anchors_text is not None:
        excluded |= candidate == number([anchors_text[i].strip() for i in rows])[:, None]
    if pool_rows is not None:
        excluded |= torch.from_numpy(pool_rows)[indices] == torch.from_numpy(rows)[:, None]
    chosen = select_negatives(scores, indices, positive_scores, excluded, num_negatives, range_min, range_max,
                              relative_margin, absolute_margin, seed)
    complete = (chosen >= 0).all(dim=1)
    kept = rows[complete.numpy()]
    out = table.take(pa.array(kept))
    for j in range(num_negatives):
        out = out.append_column(f"negative_{j + 1}", pa.array([pool_text[c] for c in chosen[complete, j].tolist()]))
    write_rows(out, output)
    return {"rows": n, "written": len(kept), "skipped": int((~good).sum()), "without_enough_negatives": int((~complete).sum()),
            "skipped_examples": (bad_a + bad_b)[:5], "candidates": len(pool_z), "num_negatives": num_negatives,
            "seconds": round(time.time() - start, 3), "output": output}


def write_rows(table, output: str) -> None:
    """`table` to `output`, in the format its extension names (jsonl, csv, parquet)."""
    import json

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    extension = output.lower().rsplit(".", 1)[-1]
    if extension == "parquet":
        pq.write_table(table, output)
    elif extension == "csv":
        pacsv.write_csv(table, output)
    elif extension in ("jsonl", "json"):
        with open(output, "w", encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    else:
        raise ConfigError(f"--output: {output} should end in .jsonl, .csv or .parquet")
