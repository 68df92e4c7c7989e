"""distributed_cl.data.examples: the example datasets it writes hold the built-in data, in their formats."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distributed_cl.data import examples
from distributed_cl.data.emoji import EMOJI_FONT, load_emoji
from distributed_cl.data.images import fashion_mnist
from distributed_cl.data.wordnet import SUPERSENSES, load_wordnet

REPO = Path(__file__).resolve().parents[1]
ROWS = 20
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
AVAILABLE = {  # dataset -> the Debian data it is made from
    "fashion_mnist_png": Path(examples.FASHION_MNIST_ROOT).is_dir(),
    "wordnet_pairs": Path("/usr/share/wordnet/data.noun").exists(),
    "emoji_wds": Path(EMOJI_FONT).exists(),
    "emoji_parquet": Path(EMOJI_FONT).exists(),
}
needs = {name: pytest.mark.skipif(not ok, reason=f"{name}: its Debian data is not installed")
         for name, ok in AVAILABLE.items()}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One run of the writer for all tests (its start-up, importing torch, is most of its time)."""
    only = [name for name, ok in AVAILABLE.items() if ok]
    if not only:
        pytest.skip("none of the Debian data is installed")
    path = tmp_path_factory.mktemp("examples")
    command = [sys.executable, "-m", "distributed_cl.data.examples", "--out", str(path), "--max-rows", str(ROWS)]
    subprocess.run([*command, "--only", ",".join(only)], check=True, cwd=REPO)
    return path


@pytest.fixture(scope="module")
def emoji():
    return load_emoji(image_size=32, test_size=300, seed=0)  # the cache the writer made


@needs["fashion_mnist_png"]
def test_fashion_mnist_png(out):
    data = fashion_mnist(examples.FASHION_MNIST_ROOT, examples.CACHE_DIR)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        root = out / "fashion_mnist_png" / split
        assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES)
        assert len(list(root.glob("*/*.png"))) == ROWS
        for i in range(ROWS):
            with Image.open(root / CLASSES[labels[i]] / f"{i:05d}.png") as image:
                assert image.mode == "L" and image.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(image), images[i].numpy())


@needs["wordnet_pairs"]
def test_wordnet_pairs(out):
    data = load_wordnet()
    for split, pairs in (("train", data.train), ("test", data.test)):
        lines = (out / "wordnet_pairs" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        expected = [{"anchor": a, "positive": p, "label": SUPERSENSES[label]}
                    for a, p, label in zip(pairs.anchors[:ROWS], pairs.positives[:ROWS], pairs.labels[:ROWS].tolist())]
        assert [json.loads(line) for line in lines] == expected


@needs["emoji_wds"]
def test_emoji_wds(out, emoji):
    root = out / "emoji_wds"
    assert sorted(p.name for p in root.iterdir()) == ["test-000000.tar", "train-000000.tar"]
    for split, part in (("train", emoji.train), ("test", emoji.test)):
        with tarfile.open(root / f"{split}-000000.tar") as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == [f"{i:09d}.{ext}" for i in range(ROWS) for ext in ("png", "txt")]
            assert all(m.isfile() and m.mode == 0o644 for m in members)
            for i in range(ROWS):
                with Image.open(tar.extractfile(members[2 * i])) as image:
                    assert image.mode == "RGB"
                    np.testing.assert_array_equal(np.asarray(image), part.images[i].permute(1, 2, 0).numpy())
                assert tar.extractfile(members[2 * i + 1]).read().decode("utf-8") == part.captions[i]


@needs["emoji_parquet"]
def test_emoji_parquet(out, emoji):
    for split, part in (("train", emoji.train), ("test", emoji.test)):
        table = pq.read_table(out / "emoji_parquet" / f"{split}.parquet")
        assert table.column_names == ["image", "caption"]
        assert str(table.schema.field("image").type) == "binary" and str(table.schema.field("caption").type) == "string"
        assert table.column("caption").to_pylist() == part.captions[:ROWS]
        for i, png in enumerate(table.column("image").to_pylist()):
            with Image.open(io.BytesIO(png)) as image:
                np.testing.assert_array_equal(np.asarray(image), part.images[i].permute(1, 2, 0).numpy())


@needs["emoji_wds"]
def test_rerun_replaces_output_with_identical_shards(out, tmp_path):
    # in-process (a second interpreter would spend most of this test importing torch), after the writer's own run
    run = ["--out", str(tmp_path), "--only", "emoji_wds", "--max-rows", str(ROWS)]
    examples.main(run)
    shard = tmp_path / "emoji_wds" / "train-000000.tar"
    assert shard.read_bytes() == (out / "emoji_wds" / "train-000000.tar").read_bytes()
    (tmp_path / "emoji_wds" / "stale.tar").write_bytes(b"")
    examples.main(run)
    assert shard.read_bytes() == (out / "emoji_wds" / "train-000000.tar").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji_wds"]  # no temporary directories left
    assert sorted(p.name for p in (tmp_path / "emoji_wds").iterdir()) == ["test-000000.tar", "train-000000.tar"]
