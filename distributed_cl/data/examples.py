"""Write the built-in datasets as example files in standard formats, so that users can see the formats and the
example configs can run offline:

    python -m distributed_cl.data.examples [--out DIR] [--only NAMES] [--max-rows N]

fashion_mnist_png/{train,test}/<class>/<index>.png   an image folder (torchvision's ImageFolder layout)
wordnet_pairs/{train,test}.jsonl                     {"anchor": ..., "positive": ..., "label": ...} per line
emoji_wds/{train,test}-NNNNNN.tar                    webdataset shards: <key>.png and <key>.txt per sample
emoji_parquet/{train,test}.parquet                   columns image (PNG bytes) and caption (string)

Every class folder is made even when --max-rows leaves it empty, so that the folder names (and so ImageFolder's
class indices) do not depend on it; loading such a tiny folder with ImageFolder needs allow_empty=True.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from distributed_cl.data.emoji import load_emoji
from distributed_cl.data.images import fashion_mnist
from distributed_cl.data.wordnet import SUPERSENSES, load_wordnet

# Fashion-MNIST's classes in label order, made filesystem-safe ("T-shirt/top", "Ankle boot").
FASHION_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle_boot")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian dataset-fashion-mnist
CACHE_DIR = "~/.cache/distributed_cl"  # where the loaders stage Fashion-MNIST and cache the rendered emoji
SHARD_SIZE = 500  # samples per webdataset shard
_PNG_CHUNK = 2000  # Fashion-MNIST images per worker task
_MTIME = 946684800  # 2000-01-01 UTC: tar members' fixed mtime, so that shards are byte-identical across runs


def write_fashion_mnist_png(dest: Path, max_rows: int | None = None) -> tuple[int, int]:
    """Fashion-MNIST as 28x28 grayscale PNGs in dest/{train,test}/<class>/<index>.png; returns the row counts."""
    data = fashion_mnist(FASHION_MNIST_ROOT, CACHE_DIR)
    jobs, counts = [], []
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        images, labels = images[:max_rows].numpy(), labels[:max_rows].numpy()
        for name in FASHION_CLASSES:
            (dest / split / name).mkdir(parents=True)
        jobs += [(dest / split, start, images[start:start + _PNG_CHUNK], labels[start:start + _PNG_CHUNK])
                 for start in range(0, len(images), _PNG_CHUNK)]
        counts.append(len(images))
    # fork (where there is one) starts workers without re-importing torch; they only use numpy and PIL.
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with context.Pool(min(os.cpu_count() or 1, len(jobs))) as pool:
        pool.map(_save_pngs, jobs, chunksize=1)
    return counts[0], counts[1]


def _save_pngs(job: tuple[Path, int, np.ndarray, np.ndarray]) -> None:
    root, start, images, labels = job
    for i, (image, label) in enumerate(zip(images, labels, strict=True), start):
        path = root / FASHION_CLASSES[label] / f"{i:05d}.png"
        Image.fromarray(image, mode="L").save(path, optimize=False, compress_level=1)


def write_wordnet_pairs(dest: Path, max_rows: int | None = None) -> tuple[int, int]:
    """WordNet (definition, example) pairs as dest/{train,test}.jsonl, labelled by supersense name."""
    data = load_wordnet()
    counts = []
    for split, pairs in (("train", data.train), ("test", data.test)):
        rows = list(zip(pairs.anchors, pairs.positives, pairs.labels.tolist(), strict=True))[:max_rows]
        with open(dest / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for anchor, positive, label in rows:
                f.write(json.dumps({"anchor": anchor, "positive": positive, "label": SUPERSENSES[label]},
                                   ensure_ascii=False) + "\n")
        counts.append(len(rows))
    return counts[0], counts[1]


@cache
def _emoji_pngs(max_rows: int | None) -> dict[str, tuple[list[bytes], list[str]]]:
    """Split -> (PNG bytes, captions) of the built-in emoji pairs, shared by the shard and parquet writers."""
    data = load_emoji(image_size=32, test_size=300, seed=0, cache_dir=CACHE_DIR)
    return {split: ([_png(image) for image in part.images[:max_rows]], part.captions[:max_rows])
            for split, part in (("train", data.train), ("test", data.test))}


def _png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_emoji_wds(dest: Path, max_rows: int | None = None) -> tuple[int, int]:
    """Emoji image-caption pairs as webdataset shards dest/{train,test}-NNNNNN.tar of at most SHARD_SIZE samples."""
    splits = _emoji_pngs(max_rows)
    for split, (pngs, captions) in splits.items():
        for shard, start in enumerate(range(0, len(pngs), SHARD_SIZE)):
            with tarfile.open(dest / f"{split}-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(start, min(start + SHARD_SIZE, len(pngs))):
                    _add_member(tar, f"{i:09d}.png", pngs[i])
                    _add_member(tar, f"{i:09d}.txt", captions[i].encode("utf-8"))
    return len(splits["train"][1]), len(splits["test"][1])


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, _MTIME
    tar.addfile(info, io.BytesIO(data))


def write_emoji_parquet(dest: Path, max_rows: int | None = None) -> tuple[int, int]:
    """Emoji image-caption pairs as dest/{train,test}.parquet with columns image (PNG bytes) and caption."""
    splits = _emoji_pngs(max_rows)
    for split, (pngs, captions) in splits.items():
        table = pa.table({"image": pa.array(pngs, pa.binary()), "caption": pa.array(captions, pa.string())})
        pq.write_table(table, dest / f"{split}.parquet")
    return len(splits["train"][1]), len(splits["test"][1])


WRITERS: dict[str, Callable[..., tuple[int, int]]] = {
    "fashion_mnist_png": write_fashion_mnist_png,
    "wordnet_pairs": write_wordnet_pairs,
    "emoji_wds": write_emoji_wds,
    "emoji_parquet": write_emoji_parquet,
}


def replace_dir(final: Path, write: Callable[[Path], tuple[int, int]]) -> tuple[int, int]:
    """Run `write` on a fresh directory beside `final`, then put it in place of `final` (replacing any old one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        result = write(tmp)
        if final.exists():
            old = tmp.with_name(tmp.name + ".old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when `write` failed
    return result


def main(argv: list[str] | None = None) -> None:
    """Command line: write the datasets named by --only (default: all) under --out, one line printed for each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/examples"), help="output directory")
    parser.add_argument("--only", default=",".join(WRITERS), help="comma-separated subset of: %(default)s")
    parser.add_argument("--max-rows", type=int, help="keep only the first N train and N test rows of each")
    args = parser.parse_args(argv)
    names = [name for name in args.only.split(",") if name]
    if unknown := sorted(set(names) - set(WRITERS)):
        parser.error(f"--only: unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(WRITERS)}")
    if args.max_rows is not None and args.max_rows < 1:
        parser.error("--max-rows must be at least 1")
    for name in names:
        start, final = time.perf_counter(), args.out / name
        train, test = replace_dir(final, partial(WRITERS[name], max_rows=args.max_rows))
        shards = f", shards {final}/train-{{000000..{(train - 1) // SHARD_SIZE:06d}}}.tar" if name == "emoji_wds" else ""
        print(f"{final}: {train} train + {test} test rows{shards} in {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
