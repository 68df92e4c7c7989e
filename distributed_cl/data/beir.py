"""A retrieval benchmark in BEIR's layout, the one MTEB and sentence-transformers read:

    DIR/corpus.jsonl      {"_id": ..., "title": ..., "text": ...} a line (or "image": a path relative
                          to DIR, a URI, or base64 bytes under "image_bytes", for image-text towers)
    DIR/queries.jsonl     {"_id": ..., "text": ...} a line
    DIR/qrels/<split>.tsv query-id, corpus-id, score (a header line first); score > 0 is relevant

A corpus text is its title and text joined by a space, as BEIR's own evaluation embeds it. The
queries and the judgements are small and read here; the corpus is listed here (its ids, to check
the judgements before anything is embedded) and streamed through Ray Data by `corpus_dataset`.
"""

from __future__ import annotations

import base64
import csv
import json
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from distributed_cl.data.formats import decode_image
from distributed_cl.options import ConfigError

CORPUS, QUERIES = "corpus.jsonl", "queries.jsonl"


@dataclass
class Beir:
    """A benchmark directory's queries, corpus ids and judgements.

    relevant[i]: the corpus positions relevant to query i (with their scores), for the queries
    that have a judgement (as sentence-transformers' evaluator, a query without one is left out)."""

    directory: str
    query_ids: list[str]
    queries: list[str]
    corpus_ids: list[str]
    relevant: list[dict[int, int]]
    corpus_kind: str  # "text" or "image"
    corpus: list[str] | torch.Tensor | None = None  # the documents decoded, where held in memory (`with_corpus`)

    def __len__(self) -> int:
        return len(self.queries)

    def with_corpus(self, image_size: int) -> Beir:
        """This benchmark with its documents decoded into memory (texts, or uint8 images), for an
        evaluation during training. A document that does not decode is an error here: it would
        change the figures."""
        rows = list(_lines(os.path.join(self.directory, CORPUS), "beir"))
        columns = {key: np.asarray([row.get(key) for row in rows], dtype=object)
                   for key in ("_id", "title", "text", "image", "image_bytes")}
        decoded = decode_corpus_batch(columns, self.directory, self.corpus_kind, image_size)
        bad = [f"{i}: {e}" for i, e in zip(decoded["id"], decoded["error"]) if e]
        if bad:
            raise ConfigError(f"beir: {len(bad)} documents of {CORPUS} do not decode, e.g. {bad[0]}")
        corpus = decoded["a"].tolist() if self.corpus_kind == "text" else torch.from_numpy(decoded["a"])
        return replace(self, corpus=corpus)


def _lines(path: str, field: str):
    if not os.path.isfile(path):
        raise ConfigError(f"{field}: {path} does not exist (a BEIR directory holds corpus.jsonl, queries.jsonl "
                          "and qrels/<split>.tsv)")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{field}: {path} line {number} is not JSON: {e}") from None
                if "_id" not in row:
                    raise ConfigError(f"{field}: {path} line {number} has no _id")
                yield row


def corpus_kind(directory: str, field: str = "beir") -> str:
    """"image" where the corpus rows carry an image (a path or bytes), else "text"."""
    first = next(_lines(os.path.join(directory, CORPUS), field), None)
    if first is None:
        raise ConfigError(f"{field}: {os.path.join(directory, CORPUS)} is empty")
    return "image" if "image" in first or "image_bytes" in first else "text"


def load_beir(directory: str, split: str = "test", field: str = "beir") -> Beir:
    """The queries and judgements of `split`, and the corpus's ids (the corpus itself is not read
    into memory). Errors name the file and the id: a judgement naming an unknown query or
    document, an empty corpus, no judged query."""
    directory = os.path.abspath(os.path.expanduser(directory))
    kind = corpus_kind(directory, field)
    corpus_ids = [str(row["_id"]) for row in _lines(os.path.join(directory, CORPUS), field)]
    position = {doc: i for i, doc in enumerate(corpus_ids)}
    if len(position) != len(corpus_ids):
        raise ConfigError(f"{field}: {CORPUS} has duplicate _id values")
    queries = {str(row["_id"]): str(row.get("text", "")) for row in _lines(os.path.join(directory, QUERIES), field)}
    qrels_path = os.path.join(directory, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_path):
        splits = sorted(p.removesuffix(".tsv") for p in os.listdir(os.path.join(directory, "qrels"))) \
            if os.path.isdir(os.path.join(directory, "qrels")) else []
        raise ConfigError(f"{field}: {qrels_path} does not exist (splits here: {', '.join(splits) or 'none'})")
    judged: dict[str, dict[int, int]] = {}
    with open(qrels_path, encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (number == 1 and not row[-1].lstrip("-").isdigit()):  # the header
                continue
            if len(row) < 3:
                raise ConfigError(f"{field}: {qrels_path} line {number}: expected query-id, corpus-id, score")
            query, doc, score = row[0], row[1], int(row[2])
            if query not in queries:
                raise ConfigError(f"{field}: {qrels_path} line {number} names query {query!r}, not in {QUERIES}")
            if doc not in position:
                raise ConfigError(f"{field}: {qrels_path} line {number} names document {doc!r}, not in {CORPUS}")
            if score > 0:
                judged.setdefault(query, {})[position[doc]] = score
    if not judged:
        raise ConfigError(f"{field}: {qrels_path} judges no document relevant to any query")
    query_ids = [q for q in queries if q in judged]
    return Beir(directory, query_ids, [queries[q] for q in query_ids], corpus_ids, [judged[q] for q in query_ids],
                kind)


def corpus_text(row: dict) -> str:
    """BEIR's document text: the title, a space, the text (stripped)."""
    return f"{row.get('title') or ''} {row.get('text') or ''}".strip()


def decode_corpus_batch(batch: dict[str, np.ndarray], directory: str, kind: str, image_size: int) -> dict[str, np.ndarray]:
    """Corpus rows -> {"id", "a" (texts, or uint8 images), "error"}: the decode stage, in Ray Data tasks."""
    n = len(batch["_id"])
    errors = np.full(n, "", dtype=object)
    if kind == "text":
        values = np.asarray([corpus_text({k: batch[k][i] for k in ("title", "text") if k in batch}) for i in range(n)],
                            dtype=object)
        errors[values == ""] = "empty title and text"
    else:
        values = np.zeros((n, 3, image_size, image_size), np.uint8)
        for i in range(n):
            try:
                values[i] = decode_image(_image_bytes(batch, i, directory), image_size)
            except Exception as e:  # this document's, never the run's
                errors[i] = f"{batch['_id'][i]}: {type(e).__name__}: {e}"[:300]
    return {"id": np.asarray([str(x) for x in batch["_id"]], dtype=object), "a": values, "error": errors}


def _image_bytes(batch: dict, i: int, directory: str) -> bytes:
    encoded = batch.get("image_bytes")
    if encoded is not None and encoded[i]:
        return base64.b64decode(encoded[i])
    path = str(batch["image"][i])
    if "://" in path:
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read()
    with open(path if os.path.isabs(path) else os.path.join(directory, path), "rb") as f:
        return f.read()
