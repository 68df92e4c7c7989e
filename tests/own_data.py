"""Tiny datasets in every standard format, written by the tests: images whose colour says their
class (so a few steps learn something), texts that name their row."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("red", "green", "blue", "grey")
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (120, 120, 120)}


def image(label: str, i: int, size: int = 12) -> np.ndarray:
    rng = np.random.default_rng(i)
    pixels = np.clip(np.array(COLOURS[label]) + rng.integers(-40, 40, (size, size, 3)), 0, 255)
    return pixels.astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def rows(n: int, start: int = 0) -> list[dict]:
    """Row i: an image of class CLASSES[i % 4], its caption, a text pair that names the row."""
    out = []
    for i in range(start, start + n):
        label = CLASSES[i % len(CLASSES)]
        out.append({"key": f"{i:06d}", "label": label, "png": png(image(label, i)),
                    "anchor": f"question {i} about {label}", "positive": f"answer {i} is {label}",
                    "caption": f"a {label} square number {i}"})
    return out


def hard_negatives(i: int) -> list[str]:
    """Row i's hard negatives: its answer with each of the other three colours (the first: its `negative`)."""
    k = i % len(CLASSES)
    return [f"answer {i} is {other}" for other in CLASSES[k + 1:] + CLASSES[:k]]


def write_text_rows(path: Path, n: int, start: int = 0, bad_is_same: int = 0, mismatched: bool = True,
                    negatives: bool = False, broken_negatives: int = 0) -> Path:
    """JSONL rows for the pair columns: anchor, positive, a hard `negative` (row i's answer with
    another colour), and `is_same` (with `mismatched`, 0 on every third row, whose `positive` is
    then another row's answer); the first `bad_is_same` rows get is_same 2. With `negatives`, the
    three hard negatives of `hard_negatives` too, twice: in columns negative_1..negative_3 and as
    one list-valued column `negatives`; the first `broken_negatives` rows lack negative_2 (and list two)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows(n, start):
            i, label = int(r["key"]), r["label"]
            other = CLASSES[(i + 1) % len(CLASSES)]
            same = i % 3 != 0 or not mismatched
            record = {"anchor": r["anchor"], "positive": r["positive"] if same else f"answer {i + 7} is {other}",
                      "negative": f"answer {i} is {other}", "is_same": int(same), "label": label}
            if i - start < bad_is_same:
                record["is_same"] = 2  # (an int still: Arrow's JSON reader wants one type a column)
            if negatives:
                listed = hard_negatives(i)
                record |= {f"negative_{j + 1}": text for j, text in enumerate(listed)} | {"negatives": listed}
                if i - start < broken_negatives:
                    del record["negative_2"]
                    record["negatives"] = listed[:2]
            f.write(json.dumps(record) + "\n")
    return path


def write_imagefolder(root: Path, n: int, start: int = 0) -> Path:
    for r in rows(n, start):
        (root / r["label"]).mkdir(parents=True, exist_ok=True)
        (root / r["label"] / f"{r['key']}.png").write_bytes(r["png"])
    return root


def write_jsonl(path: Path, n: int, start: int = 0, images: bool = False) -> Path:
    """JSONL rows: anchor, positive, caption, label, and with `images` an image path relative to the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows(n, start):
            record = {k: r[k] for k in ("anchor", "positive", "caption", "label")}
            if images:
                (path.parent / "images").mkdir(exist_ok=True)
                (path.parent / "images" / f"{r['key']}.png").write_bytes(r["png"])
                record["image"] = f"images/{r['key']}.png"
            f.write(json.dumps(record) + "\n")
    return path


def write_csv(path: Path, n: int, start: int = 0) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "images").mkdir(exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "label"])  # open_clip's CSV columns
        for r in rows(n, start):
            (path.parent / "images" / f"{r['key']}.png").write_bytes(r["png"])
            writer.writerow([f"images/{r['key']}.png", r["caption"], r["label"]])
    return path


def write_parquet(path: Path, n: int, start: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    data = rows(n, start)
    pq.write_table(pa.table({"image": [r["png"] for r in data], "caption": [r["caption"] for r in data],
                             "label": [r["label"] for r in data]}), path)
    return path


def write_shards(directory: Path, n: int, per_shard: int, prefix: str = "train", start: int = 0) -> list[Path]:
    """webdataset shards {prefix}-000000.tar ...: {key}.png, {key}.txt, {key}.cls, contiguous per sample."""
    directory.mkdir(parents=True, exist_ok=True)
    data, paths = rows(n, start), []
    for s in range(0, n, per_shard):
        path = directory / f"{prefix}-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for r in data[s : s + per_shard]:
                for ext, payload in (("png", r["png"]), ("txt", r["caption"].encode()), ("cls", r["label"].encode())):
                    info = tarfile.TarInfo(f"{r['key']}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths
