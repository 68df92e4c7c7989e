"""Your own data: files in a standard format, read and decoded by Ray Data, for any task.

The formats (FORMATS, by `dataset.format`; each an options model of the `dataset` section):
- imagefolder: `path/<class>/<file>`; the folder names are the labels (sorted, as torchvision's
  ImageFolder numbers them).
- csv, jsonl, parquet: rows with the columns `dataset.columns` names. An image column holds a
  file path (relative to the file that lists it, or a URI) or the encoded bytes; a text column a
  string; `label` an int or a string (strings become stable 63-bit ids).
- webdataset: tar shards of `{key}.{ext}` files, as open_clip and img2dataset write them;
  `columns` names extensions, `;` between alternatives (`jpg;png;webp`).
- huggingface: a directory `datasets`' save_to_disk wrote (a Dataset, or a DatasetDict's `split`;
  `eval_split` holds out another split), its Arrow files streamed; with `download`, a Hub dataset.

`path` (and `eval_path`) is a directory, a file, a glob or a brace pattern
(`train-{000000..000127}.tar`), locally or behind an s3:// / gs:// / file:// URI: every path goes
through pyarrow's filesystems, the layer Ray Data reads with.

Decoding (images to RGB, shorter side resized to `image_size` and centre-cropped; texts
stripped) runs in Ray Data's CPU tasks, anywhere in the cluster. A row that does not decode,
or whose text is empty, keeps its place with an `error` ("<file or key>: <reason>") and is
dropped where it is consumed, counted. Without `eval_path`, a row is held out when a hash of
(seed, its key) falls under `eval_fraction`: the same rows on every run and every worker, the
same for duplicate rows of csv/jsonl/parquet (the key is the row's content, so no copy of a
held-out row trains).
"""

from __future__ import annotations

import collections
import csv
import fnmatch
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from distributed_cl.data import huggingface as hf
from distributed_cl.options import ConfigError, Options, absolute, field_error

if TYPE_CHECKING:
    import pyarrow as pa

    from distributed_cl.data.table import Splits, Table

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_BYTES = 256  # a text's decoded size, for the automatic cache decision


# ----------------------------------------------------------------------------- paths


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{x,y}` -> x, y."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match[1], pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric[1], numeric[2]
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for option in options for p in expand_braces(head + option + tail)]


def resolve(path: str, extensions: tuple[str, ...] | None, field: str = "dataset.path"):
    """(pyarrow filesystem, sorted file paths on it, the root the paths sit under) for `path`.
    A directory is listed recursively for files with `extensions`."""
    import pyarrow.fs as pafs

    if "://" in path:
        # braces and globs are not URI characters: parse the URI up to the last "/" before them
        special = re.search(r"[{*?\[]", path)
        cut = path.rindex("/", 0, special.start()) + 1 if special else len(path)
        try:
            fs, base = pafs.FileSystem.from_uri(path[:cut])
        except Exception as e:  # unknown scheme, no credentials, no network
            raise ConfigError(f"{field}: cannot open {path}: {e}") from None
        patterns = expand_braces(base.rstrip("/") + ("/" + path[cut:] if path[cut:] else ""))
    else:
        fs = pafs.LocalFileSystem()
        patterns = expand_braces(os.path.abspath(os.path.expanduser(path)))
    files, root = [], None
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0].rsplit("/", 1)[0]
            listing = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
            found = [i.path for i in listing if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern)]
            root = root or prefix
        else:
            info = fs.get_file_info(pattern)
            if info.type == pafs.FileType.NotFound:
                raise ConfigError(f"{field}: {pattern} does not exist")
            if info.type == pafs.FileType.Directory:
                listing = fs.get_file_info(pafs.FileSelector(pattern, recursive=True))
                found = [i.path for i in listing if i.type == pafs.FileType.File
                         and (extensions is None or i.path.lower().rsplit(".", 1)[-1] in extensions)]
                root = root or pattern
            else:
                found = [pattern]
                root = root or pattern.rsplit("/", 1)[0]
        files += found
    files = sorted(set(files))
    if not files:
        wanted = f" with extension {', '.join(extensions)}" if extensions else ""
        raise ConfigError(f"{field}: {path} matches no files{wanted}")
    return fs, files, root.rstrip("/")


def stable_id(text: str) -> int:
    """A label string as a non-negative int63, the same on every machine and run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def held_out(keys: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Whether each row (by its key) belongs to the held-out split."""
    u = [int.from_bytes(hashlib.blake2b(f"{seed}/{k}".encode(), digest_size=8).digest(), "little") / 2**64
         for k in keys]
    return np.asarray(u) < fraction


# ----------------------------------------------------------------------------- formats


def _csv_columns(fs, files):
    with fs.open_input_stream(files[0]) as f:
        return next(csv.reader(io.TextIOWrapper(f, encoding="utf-8")), [])


def _jsonl_columns(fs, files):
    keys: dict[str, None] = {}
    with fs.open_input_stream(files[0]) as f:
        for i, line in enumerate(io.TextIOWrapper(f, encoding="utf-8")):
            if line.strip():
                keys |= dict.fromkeys(json.loads(line))
            if i >= 100:
                break
    return list(keys)


def _parquet_columns(fs, files):
    import pyarrow.parquet as pq

    with fs.open_input_file(files[0]) as f:
        return pq.read_schema(f).names


def _list_length(format: str, fs, files, column: str) -> int | None:
    """The most common length of the non-empty lists among the first 100 values of `column` in the
    first file (jsonl, parquet and huggingface's Arrow files can hold lists), or None: no lists."""
    values = []
    if format == "jsonl":
        with fs.open_input_stream(files[0]) as f:
            lines = (line for line in io.TextIOWrapper(f, encoding="utf-8") if line.strip())
            values = [json.loads(line).get(column) for _, line in zip(range(100), lines)]
    elif format == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(files[0]) as f:
            first = pq.ParquetFile(f)
            if column in first.schema_arrow.names:
                batch = next(first.iter_batches(batch_size=100, columns=[column]), None)
                values = [] if batch is None else batch[column].to_pylist()
    elif format == "huggingface":  # Arrow IPC streams, as save_to_disk writes them
        import pyarrow as pa

        with fs.open_input_stream(files[0]) as f:
            reader = pa.ipc.open_stream(f)
            if column in reader.schema.names:
                batch = next(iter(reader), None)
                values = [] if batch is None else batch[column][:100].to_pylist()
    lengths = collections.Counter(len(v) for v in values if isinstance(v, list) and v)
    return lengths.most_common(1)[0][0] if lengths else None


def _webdataset_columns(fs, files):
    extensions: dict[str, None] = {}
    with fs.open_input_stream(files[0]) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for i, member in enumerate(tar):
            if member.isfile() and "." in os.path.basename(member.name):
                extensions[os.path.basename(member.name).split(".", 1)[1]] = None
            if i >= 200:
                break
    return list(extensions)


def _local(fs) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def _count_lines(fs, files, header: bool):
    if not _local(fs):
        return None
    total = 0
    for path in files:
        with open(path, newline="", encoding="utf-8") as f:
            if header:
                total += sum(1 for _ in csv.reader(f)) - 1
            else:
                total += sum(1 for line in f if line.strip())
    return total


def _count_parquet(fs, files):
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _count_tar_keys(fs, files):
    if not _local(fs):
        return None
    total = 0
    for path in files:
        with tarfile.open(path) as tar:
            total += len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return total


def _read(reader: str, files_per_block: int = 1, **options):
    def read(fs, files, shuffle):
        import ray.data

        blocks = max(1, -(-len(files) // files_per_block))  # a block per shard; small files grouped
        return getattr(ray.data, reader)(files, filesystem=fs, include_paths=True, shuffle=shuffle,
                                         override_num_blocks=blocks, **options)

    return staticmethod(read)


# ----------------------------------------------------------------------------- the formats' options


class Columns(Options):
    """Which columns (csv, jsonl, parquet) or file extensions (webdataset, `;` between
    alternatives: `jpg;png`) feed side a, side b and the labels."""

    a: str | None = None  # image: the image; text: the anchor; image_text: the image
    b: str | None = None  # text: the positive; image_text: the caption
    label: str | None = None  # optional: an int or a string per row (imagefolder: the folder names)
    # text, image_text: the hard negatives of each row, of side b's kind (texts / captions), which
    # every query of the global batch meets as negatives (loss.name: infonce). One column (one
    # negative a row, or a list-valued jsonl/parquet column: a list of texts a row), or a list of
    # columns, one negative each (`[negative_1, negative_2, ...]`, as sentence-transformers'
    # mine_hard_negatives and `train.py mine` write them). Every row has the same number h (a
    # list-valued column: the length of its first list); a row with a negative missing or empty,
    # or another count, is skipped and counted.
    negative: str | list[str] | None = None
    # text, image_text: 0/1 per row, whether a and b match (pair-labelled rows): positives only
    # where 1 (loss.name: supcon or ntxent, through pair labels; contrastive: the margin loss)
    is_same: str | None = None

    @model_validator(mode="after")
    def _negative_columns(self) -> Columns:
        names = self.negative
        if isinstance(names, list) and (not names or len(set(names)) < len(names) or not all(names)):
            raise field_error("negative", f"the list must name distinct columns, at least one; got {names}")
        return self


PAIR_COLUMNS = ("negative", "is_same")  # per-row extras of tasks with a side b


class DatasetOptions(Options):
    """Your own data, for any task (the `dataset` section; absent: the task's built-in data).
    Each format subclasses it with how its files are listed, counted and read."""

    format: str
    path: str  # a directory, file, glob or brace pattern, or an s3:// / gs:// / file:// URI
    eval_path: str | None = None  # held-out split; null: a seeded eval_fraction of `path` is held out
    eval_fraction: float = Field(0.05, ge=0, le=0.5)
    # a retrieval benchmark in BEIR's layout (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), scored
    # at every evaluation: beir_ndcg@10, beir_mrr@10, ... (its corpus held in memory)
    eval_beir: str | None = None
    eval_beir_split: str = "test"
    columns: Columns = Field(default_factory=Columns)
    image_size: int = Field(64, ge=8)  # images are decoded, converted to RGB, resized (shorter side) and centre-cropped
    # decode once and serve from memory (the built-ins' path); null: when the decoded training
    # split is known to fit in cache_limit_mb, else stream through Ray Data
    cache: bool | None = None
    cache_limit_mb: int = Field(2048, ge=0)
    max_skipped_fraction: float = Field(0.01, ge=0, le=1)  # more undecodable images / empty texts stop the run
    shuffle_buffer: int = Field(2048, ge=0)  # streamed: rows each worker shuffles among, re-seeded every epoch
    deterministic: bool = True  # streamed: same batches for the same seed (Ray Data's preserve_order)
    eval_max_rows: int = Field(10000, ge=2)  # held-out rows evaluated (decoded into memory)
    eval_bank_size: int = Field(10000, ge=1)  # training rows in the kNN bank (labelled images and texts)
    decode_cpus: float = Field(1.0, gt=0)  # CPUs per Ray Data decode task
    # as one of dataset.sources (data/sources.py): its name (prefixing its metric keys; default:
    # the file's name) and its share of the steps
    name: str | None = None
    weight: float = Field(1.0, gt=0)

    extensions: ClassVar[tuple[str, ...] | None] = None  # the files a directory path is listed for
    kind: ClassVar[str] = "column"  # what `columns` names

    @staticmethod
    def read(fs, files, shuffle):
        """ray.data.Dataset of the raw rows, with a "path" column."""
        raise NotImplementedError

    @staticmethod
    def columns_found(fs, files) -> list[str]:
        """The columns (extensions) the data has, read from its first file."""
        raise NotImplementedError

    @staticmethod
    def count(fs, files) -> int | None:
        """Rows, or None where counting would read the whole data."""
        return None

    @model_validator(mode="after")
    def _held_out_split(self) -> DatasetOptions:
        if self.held_out_field is None and self.eval_fraction == 0:
            raise field_error("eval_fraction", "must be > 0 without an eval_path (it holds out the evaluation rows)")
        return self

    @property
    def held_out_field(self) -> str | None:
        """The field that names separate held-out data (eval_path), or None: a seeded eval_fraction
        of `path` is held out."""
        return "eval_path" if self.eval_path is not None else None

    def listing(self, held_out: bool = False):
        """(filesystem, files, root) of `path`, or where `held_out` of the separate held-out data."""
        if held_out:
            return resolve(self.eval_path, self.extensions, "dataset.eval_path")
        return resolve(self.path, self.extensions)

    def absolute_paths(self) -> DatasetOptions:
        return self.model_copy(update={"path": absolute(self.path), "eval_path": self.eval_path and absolute(self.eval_path),
                                       "eval_beir": self.eval_beir and absolute(self.eval_beir)})

    @property
    def labelled(self) -> bool:
        """Whether the rows have class labels."""
        return self.columns.label is not None

    @property
    def pair_labelled(self) -> bool:
        """Whether the rows carry 0/1 pair labels (columns.is_same)."""
        return self.columns.is_same is not None

    def default_column(self, kind: str) -> str | None:
        return None

    def classes(self) -> tuple[str, ...]:
        """Class names that number the labels (imagefolder's folders); none where labels are columns."""
        return ()

    def side_columns(self, sides: tuple[str, str | None]) -> dict[str, str | tuple[str, ...]]:
        """{"a": column, "b": column, "label": column, "negative": column, "is_same": column} that
        feed this task, defaults filled in (label, negative and is_same only where the data has them);
        negatives named as a list of columns come as a tuple of them."""
        chosen = {}
        for side, kind in zip(("a", "b"), sides):
            if kind is None:
                continue
            column = getattr(self.columns, side) or self.default_column(kind)
            if column is None:
                raise ConfigError(f"dataset.columns.{side} is required: the {kind} column of side {side}")
            chosen[side] = column
        if self.columns.label is not None:
            chosen["label"] = self.columns.label
        for extra in PAIR_COLUMNS:
            column = getattr(self.columns, extra)
            if column is not None and sides[1] is None:
                raise ConfigError(f"dataset.columns.{extra} belongs to rows of two sides (task: text or image_text, "
                                  "from csv, jsonl, parquet or webdataset); the image task makes both views of one image")
            if column is not None:
                chosen[extra] = tuple(column) if isinstance(column, list) else column
        return chosen

    def negatives_per_row(self, fs=None, files=None) -> int:
        """h, the hard negatives every row has (0: no dataset.columns.negative): as many as the listed
        columns, else one, or where the column holds lists their most common length among the first
        100 rows of the data's first file (read as `columns_found` reads its columns)."""
        column = self.columns.negative
        if column is None or isinstance(column, list):
            return len(column or ())
        if fs is None:
            fs, files, _ = self.listing()
        return _list_length(self.format, fs, files, column) or 1

    def check_files(self, sides: tuple[str, str | None], global_batch_size: int) -> None:
        """Every error that reading the data's listing and first rows can find, before Ray starts:
        missing paths, columns or extensions the data lacks (listing the ones it has), an eval_path
        with other columns, data smaller than one global batch."""
        fs, files, _ = self.listing()
        found = self.columns_found(fs, files)
        for side, names in self.side_columns(sides).items():
            for column in names if isinstance(names, tuple) else (names,):
                if _missing(column, found):
                    raise ConfigError(f"dataset.columns.{side}: {self.kind} {column!r} is not in {files[0]} "
                                      f"(its {self.kind}s: {', '.join(found) or 'none'})")
        if self.held_out_field is not None:
            eval_fs, eval_files, _ = self.listing(held_out=True)
            eval_found = self.columns_found(eval_fs, eval_files)
            if set(eval_found) != set(found):
                raise ConfigError(f"dataset.{self.held_out_field}: {eval_files[0]} has the {self.kind}s {', '.join(eval_found)}, "
                                  f"but dataset.path's {files[0]} has {', '.join(found)}")
        rows = self.count(fs, files)
        if rows is not None:
            train = rows if self.held_out_field else int(rows * (1 - self.eval_fraction))
            if train < global_batch_size:
                raise ConfigError(f"dataset.path: {rows} rows (about {train} for training) cannot fill one global "
                                  f"batch of train.global_batch_size={global_batch_size}")


class ImageFolderOptions(DatasetOptions):
    """`path/<class>/<file>`; the folder names are the labels (sorted, as torchvision's ImageFolder
    numbers them)."""

    format: Literal["imagefolder"] = "imagefolder"
    extensions: ClassVar = IMAGE_EXTENSIONS
    read = _read("read_binary_files", files_per_block=256)
    columns_found = staticmethod(lambda fs, files: ["image", "label"])
    count = staticmethod(lambda fs, files: len(files))

    @property
    def labelled(self) -> bool:
        return True

    def classes(self) -> tuple[str, ...]:
        """The class folders of the training path, sorted: they number the labels of both splits."""
        import pyarrow.fs as pafs

        fs, _, root = resolve(self.path, self.extensions)
        return tuple(sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                            if i.type == pafs.FileType.Directory))

    def side_columns(self, sides: tuple[str, str | None]) -> dict[str, str]:
        if self.columns.is_same is not None or self.columns.negative is not None:
            extra = "is_same" if self.columns.is_same is not None else "negative"
            raise ConfigError(f"dataset.columns.{extra} belongs to rows of two sides (task: text or image_text, "
                              "from csv, jsonl, parquet or webdataset); the image task makes both views of one image")
        chosen = {"a": "image", "label": "label"}
        if sides[1] is not None:
            raise ConfigError(f"dataset.format: imagefolder holds images only; the {sides[1]} side needs csv, jsonl, "
                              "parquet or webdataset")
        return chosen


class CsvOptions(DatasetOptions):
    """Rows with the columns `dataset.columns` names; an image column holds a file path (relative to
    the file that lists it, or a URI) or the encoded bytes; a label an int or a string."""

    format: Literal["csv"] = "csv"
    extensions: ClassVar = ("csv",)
    read = _read("read_csv")
    columns_found = staticmethod(lambda fs, files: _csv_columns(fs, files))
    count = staticmethod(lambda fs, files: _count_lines(fs, files, header=True))


class JsonlOptions(DatasetOptions):
    """JSON Lines, as csv (Arrow's JSON reader reads JSON Lines)."""

    format: Literal["jsonl"] = "jsonl"
    extensions: ClassVar = ("jsonl", "json")
    read = _read("read_json")
    columns_found = staticmethod(lambda fs, files: _jsonl_columns(fs, files))
    count = staticmethod(lambda fs, files: _count_lines(fs, files, header=False))


class ParquetOptions(DatasetOptions):
    """Parquet files, as csv."""

    format: Literal["parquet"] = "parquet"
    extensions: ClassVar = ("parquet",)
    read = _read("read_parquet")
    columns_found = staticmethod(lambda fs, files: _parquet_columns(fs, files))
    count = staticmethod(lambda fs, files: _count_parquet(fs, files))


class WebDatasetOptions(DatasetOptions):
    """Tar shards of `{key}.{ext}` files, as open_clip and img2dataset write them; `columns` names
    extensions, `;` between alternatives (`jpg;png;webp`)."""

    format: Literal["webdataset"] = "webdataset"
    extensions: ClassVar = ("tar",)
    kind: ClassVar[str] = "extension"
    read = _read("read_webdataset", decoder=None)
    columns_found = staticmethod(lambda fs, files: _webdataset_columns(fs, files))
    count = staticmethod(lambda fs, files: _count_tar_keys(fs, files))

    def default_column(self, kind: str) -> str | None:
        return {"image": "jpg;jpeg;png;webp", "text": "txt"}[kind]


class HuggingFaceOptions(DatasetOptions):
    """A directory `datasets`' save_to_disk wrote, read with pyarrow (`datasets` not needed): a
    Dataset read whole, or a DatasetDict's `split`; its Arrow files streamed, one read task each.
    Columns as parquet's (an Image column's bytes are the image). With `download`, `path` may name
    a Hub dataset, which check_files saves under `cache_dir` before Ray starts."""

    format: Literal["huggingface"] = "huggingface"
    extensions: ClassVar = ("arrow",)
    split: str = "train"  # a DatasetDict's (a Hub dataset's) training split; a single Dataset is read whole
    # the held-out rows: this split of path's DatasetDict (of eval_path's, where that is set);
    # null: the eval_path / eval_fraction rules
    eval_split: str | None = None
    download: bool = False  # path may be a Hub dataset's name (not a local path): downloaded by check_files
    subset: str | None = None  # a Hub dataset's configuration (load_dataset's `name`)
    cache_dir: str = "~/.cache/distributed_cl/hf"  # where Hub downloads are saved (every node must see it)
    columns_found = staticmethod(lambda fs, files: hf.columns(fs, files))
    count = staticmethod(lambda fs, files: hf.count(fs, files))
    read = staticmethod(lambda fs, files, shuffle: hf.read(fs, files, shuffle))

    @property
    def held_out_field(self) -> str | None:
        return super().held_out_field or ("eval_split" if self.eval_split is not None else None)

    def listing(self, held_out: bool = False):
        if held_out and self.eval_path is not None:
            return hf.split_files(self.eval_path, self.eval_split or self.split, "dataset.eval_path",
                                  "dataset.eval_split" if self.eval_split else "dataset.split")
        split, split_field = (self.eval_split, "dataset.eval_split") if held_out else (self.split, "dataset.split")
        if not hf.is_hub_name(self.path):
            return hf.split_files(self.path, split, "dataset.path", split_field, whole=not held_out)
        if not self.download:
            hint = "" if importlib.util.find_spec("datasets") else f" (after {hf.INSTALL})"
            raise ConfigError(f"dataset.path: {self.path} is neither a directory save_to_disk wrote nor, with "
                              f"dataset.download: false, a Hub dataset to download; set dataset.download: true{hint} "
                              "to download it")
        copy = hf.hub_copy(self.cache_dir, self.path, self.subset, split)
        if not os.path.isfile(os.path.join(copy, hf.STATE)):
            raise ConfigError(f"dataset.path: the Hub dataset {self.path} has no copy at {copy}; check_files "
                              "downloads it, before Ray starts")
        return hf.split_files(copy, split, "dataset.path", split_field)

    def check_files(self, sides: tuple[str, str | None], global_batch_size: int) -> None:
        if hf.is_hub_name(self.path) and self.download:
            held_out = [self.eval_split] if self.eval_split is not None and self.eval_path is None else []
            for split in dict.fromkeys([self.split, *held_out]):
                hf.download(self.path, self.subset, split, self.cache_dir)
        elif self.subset is not None and not hf.is_hub_name(self.path):
            raise ConfigError(f"dataset.subset names a configuration of a Hub dataset; {self.path} is a local path")
        super().check_files(sides, global_batch_size)

    def absolute_paths(self) -> HuggingFaceOptions:
        paths = super().absolute_paths()
        return paths.model_copy(update={"path": self.path if hf.is_hub_name(self.path) else paths.path,
                                        "cache_dir": absolute(self.cache_dir)})


FORMATS: dict[str, type[DatasetOptions]] = {options.model_fields["format"].default: options for options in (
    ImageFolderOptions, CsvOptions, JsonlOptions, ParquetOptions, WebDatasetOptions, HuggingFaceOptions)}


def _missing(wanted: str, found: list[str]) -> bool:
    return not any(alternative in found for alternative in wanted.split(";"))


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodePlan:
    sides: tuple[str, str | None]
    columns: dict[str, str | tuple[str, ...]]  # side -> column (extension alternatives joined by ";"); negative: or columns
    image_size: int
    split: str | None  # "train" / "eval": rows of that side of the hash split; None: all rows
    seed: int
    fraction: float
    root: str
    classes: tuple[str, ...]  # imagefolder
    format: str
    passed: tuple[str, ...] = ()  # raw columns passed through undecoded, as strings (an id)
    negatives: int = 0  # h: the hard negatives of every row (columns["negative"] names them)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (3, size, size): shorter side resized, centre crop."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can decode") from None
    return np.asarray(image).transpose(2, 0, 1)


def _value(batch: dict, column: str, i: int):
    for alternative in column.split(";"):
        if alternative in batch and batch[alternative][i] is not None:
            return batch[alternative][i]
    return None


def _keys(batch: dict, plan: DecodePlan) -> list[str]:
    paths = batch["path"]
    if plan.format == "imagefolder":  # the file, under the root
        return [p[len(plan.root) + 1:] if p.startswith(plan.root) else p for p in paths]
    if plan.format == "webdataset":
        return [f"{os.path.basename(u)}/{k}" for u, k in zip(batch["__url__"], batch["__key__"])]
    return [json.dumps(_row_content(batch, plan, i)) for i in range(len(paths))]


def _row_content(batch: dict, plan: DecodePlan, i: int) -> list:
    """Row i's values of the plan's columns, flat: hard negatives in listed columns or in one
    list-valued column give the same content (and so the same held-out split)."""
    content = []
    for names in plan.columns.values():
        for column in names if isinstance(names, tuple) else (names,):
            value = _value(batch, column, i)
            content += [_jsonable(v) for v in value] if isinstance(value, (list, np.ndarray)) else [_jsonable(value)]
    return content


def _jsonable(v):
    if isinstance(v, bytes):
        return hashlib.blake2b(v, digest_size=16).hexdigest()
    return v.item() if isinstance(v, np.generic) else v


def _open_image(value, listing: str, fs_cache: dict) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    import pyarrow.fs as pafs

    if "://" in value:
        fs, path = pafs.FileSystem.from_uri(value)
    else:
        fs = fs_cache.setdefault("fs", pafs.LocalFileSystem() if listing.startswith("/") else None)
        path = value if value.startswith("/") else f"{listing.rsplit('/', 1)[0]}/{value}"
        if fs is None:  # the listing file sat behind a URI without a scheme in its path (s3 bucket/key)
            raise ValueError(f"relative image path {value!r} in a remote listing: give a URI")
    with fs.open_input_stream(path) as f:
        return f.read()


def decode_batch(batch: dict[str, np.ndarray], plan: DecodePlan) -> dict[str, np.ndarray]:
    """Raw rows -> {"a", "b", "label", "label_name", "error"} (and "negative", "is_same" where the
    plan has them): the decode stage, run in Ray Data's CPU tasks. `label_name` is the label as the
    data names it (a folder, a string; "" where none); "negative" holds each row's h hard negatives."""
    keys = np.asarray(_keys(batch, plan), dtype=object)
    if plan.split is not None:
        keep = held_out(keys, plan.seed, plan.fraction) == (plan.split == "eval")
        batch, keys = {k: np.asarray(v)[keep] for k, v in batch.items()}, keys[keep]
    n, size, fs_cache = len(keys), plan.image_size, {}
    errors = np.full(n, "", dtype=object)
    out: dict[str, np.ndarray] = {}
    for side, kind in zip(("a", "b"), plan.sides):
        if kind is None:
            continue
        column = plan.columns[side]
        values = np.zeros((n, 3, size, size), np.uint8) if kind == "image" else np.full(n, "", dtype=object)
        for i in range(n):
            if errors[i]:
                continue
            value = batch["bytes"][i] if plan.format == "imagefolder" else _value(batch, column, i)
            try:
                values[i] = _decoded(value, kind, column, batch["path"][i], size, fs_cache)
            except Exception as e:  # any decode failure is this row's, never the run's
                errors[i] = f"{keys[i]}: {type(e).__name__}: {e}"[:300]
        out[side] = values
    if plan.negatives:
        out["negative"] = _negatives(batch, plan, n, keys, errors, fs_cache)
    out["label"], out["label_name"] = _labels(batch, plan, n, keys, errors)
    if "is_same" in plan.columns:
        out["is_same"] = _is_same(batch, plan.columns["is_same"], n, keys, errors)
    for column in plan.passed:
        out[column] = np.asarray([str(v) for v in batch[column]], dtype=object)
    out["error"] = errors
    return out if n else _typed(out)


def _decoded(value, kind: str, column: str, listing: str, size: int, fs_cache: dict):
    """One value of an image or a text column decoded: RGB uint8 (3, size, size), or the stripped
    text. Raises ValueError naming `column` for a missing value or an empty text."""
    if value is None:
        raise ValueError(f"no {column}")
    if kind == "image":
        return decode_image(_open_image(value, listing, fs_cache), size)
    text = (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()
    if not text:
        raise ValueError(f"empty {column}")
    return text


def _negatives(batch, plan: DecodePlan, n: int, keys, errors, fs_cache: dict) -> np.ndarray:
    """Each row's h hard negatives, of side b's kind: per row a list of h texts (an Arrow list
    column), or images (n, h, 3, size, size). A row without exactly h good ones is an error row."""
    h, kind, names, size = plan.negatives, plan.sides[1], plan.columns["negative"], plan.image_size
    values = np.zeros((n, h, 3, size, size), np.uint8) if kind == "image" else np.empty(n, dtype=object)
    for i in range(n):
        if kind != "image":
            values[i] = [""] * h
        if errors[i]:
            continue
        try:
            for j, (value, name) in enumerate(_row_negatives(batch, names, i, h)):
                values[i][j] = _decoded(value, kind, name, batch["path"][i], size, fs_cache)
        except Exception as e:
            errors[i] = f"{keys[i]}: {type(e).__name__}: {e}"[:300]
    return values


def _row_negatives(batch, names: str | tuple[str, ...], i: int, h: int) -> list[tuple]:
    """Row i's raw negatives, each with what names it: one a listed column, or the items of one
    (list-valued) column."""
    if isinstance(names, tuple):
        return [(_value(batch, column, i), column) for column in names]
    value = _value(batch, names, i)
    items = list(value) if isinstance(value, (list, np.ndarray)) else None
    if items is None and (h == 1 or value is None):  # the row's one negative (or none: "no <column>")
        return [(value, names)]
    if items is None or len(items) != h:
        raise ValueError(f"{names} holds {1 if items is None else len(items)} negatives, not {h} as the first rows")
    return [(v, f"{names}[{j}]") for j, v in enumerate(items)]


def _typed(columns: dict[str, np.ndarray]) -> pa.Table:
    """An empty batch (the held-out filter kept none of its rows) as a table with the column types
    of a full one: from empty arrays alone Ray Data cannot tell an image tensor or a string."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    def typed(name: str, v: np.ndarray):
        if v.ndim > 1:
            return ArrowTensorArray.from_numpy(v)
        if v.dtype != object:
            return pa.array(v)
        return pa.array(v, type=pa.list_(pa.string()) if name == "negative" else pa.string())  # negative: h texts a row

    return pa.table({k: typed(k, v) for k, v in columns.items()})


def _labels(batch, plan: DecodePlan, n: int, keys, errors) -> tuple[np.ndarray, np.ndarray]:
    labels, names = np.full(n, -1, np.int64), np.full(n, "", dtype=object)
    if "label" not in plan.columns:
        return labels, names
    for i in range(n):
        try:
            if plan.classes:  # imagefolder: the first folder under the root
                names[i] = keys[i].split("/", 1)[0]
                labels[i] = plan.classes.index(names[i])
                continue
            value = _value(batch, plan.columns["label"], i)
            if isinstance(value, bytes):
                value = value.decode("utf-8").strip()
            if isinstance(value, (int, np.integer)) or (isinstance(value, str) and re.fullmatch(r"-?\d+", value)):
                labels[i] = int(value)
            elif isinstance(value, str) and value:
                labels[i] = stable_id(value)
            else:
                raise ValueError(f"label {value!r}")
            names[i] = str(value)
        except Exception as e:
            errors[i] = errors[i] or f"{keys[i]}: {type(e).__name__}: {e}"[:300]
    return labels, names


TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _is_same(batch, column: str, n: int, keys, errors) -> np.ndarray:
    """0/1 per row from 0/1, booleans or their strings; anything else makes the row an error."""
    flags = np.zeros(n, np.int64)
    for i in range(n):
        value = _value(batch, column, i)
        value = value.item() if isinstance(value, np.generic) else value
        if isinstance(value, (bool, int, float)):
            text = str(int(value)) if value in (0, 1) else repr(value)
        else:
            text = (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip().lower()
        if text in TRUE:
            flags[i] = 1
        elif text not in FALSE:
            errors[i] = errors[i] or f"{keys[i]}: ValueError: {column} {value!r} is not 0/1"[:300]
    return flags


# ----------------------------------------------------------------------------- datasets and splits


def decoded_dataset(dataset: DatasetOptions, sides: tuple[str, str | None], split: str | None, seed: int,
                    verbose: bool = False, passed: tuple[str, ...] = ()):
    """The Ray Data pipeline of decoded rows for `split` ("train" or "eval"; None: every row of
    `path`): read (files shuffled by a fixed seed for training), decode in CPU tasks, with the raw
    columns `passed` beside. Ordered when dataset.deterministic."""
    import ray.data

    x = dataset
    separate = split == "eval" and x.held_out_field is not None
    fs, files, root = x.listing(held_out=separate)
    negatives = x.negatives_per_row() if separate else x.negatives_per_row(fs, files)  # h as `path`'s rows have it
    plan = DecodePlan(sides, x.side_columns(sides), x.image_size, None if x.held_out_field else split, seed,
                      x.eval_fraction, root, x.classes(), x.format, passed, negatives)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = x.deterministic
    if not verbose:  # Ray Data's progress lines would bury the trainer's
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context.enable_progress_bars = False
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=False) if split == "train" else None
    raw = x.read(fs, files, shuffle)
    return raw.map_batches(functools.partial(decode_batch, plan=plan), batch_format="numpy", batch_size=64,
                           num_cpus=x.decode_cpus)


def materialize(dataset, labelled: bool, limit: int | None = None) -> tuple[Table, int, list[str]]:
    """A decoded dataset read into memory on this process: (good rows, skipped rows, examples)."""
    from distributed_cl.data.table import Table
    parts, skipped, examples, rows = [], 0, [], 0
    for batch in dataset.iter_batches(batch_size=1024, batch_format="numpy"):
        errors = batch.pop("error")
        bad = errors != ""
        skipped += int(bad.sum())
        examples += [str(e) for e in errors[bad][: max(0, 5 - len(examples))]]
        if (~bad).any():
            parts.append(Table.from_numpy({k: v[~bad] for k, v in batch.items()}, labelled))
            rows += len(parts[-1])
        if limit is not None and rows >= limit:
            break
    if not parts:
        raise ConfigError(f"dataset: no row decoded ({skipped} skipped, e.g. {'; '.join(examples) or 'none'})")
    table = Table.concat(parts)
    return (table.head(limit) if limit is not None else table), skipped, examples


def should_cache(x: DatasetOptions, sides: tuple[str, str | None], rows: int | None) -> bool:
    """`dataset.cache`, or where it is null whether `rows` (None: unknown) fit the cache limit decoded."""
    if x.cache is not None:
        return x.cache
    if rows is None:
        return False
    kinds = [*sides, *[sides[1]] * (x.negatives_per_row() if x.columns.negative else 0)]  # and h hard negatives
    row_bytes = sum(3 * x.image_size**2 if kind == "image" else TEXT_BYTES for kind in kinds if kind)
    return rows * row_bytes <= x.cache_limit_mb * 2**20


def load_dataset_splits(dataset: DatasetOptions, sides: tuple[str, str | None], seed: int,
                        verbose: bool = False) -> Splits:
    """The held-out split and kNN bank decoded into memory, and the training split too where it is
    cached; a streamed training split is left to `decoded_dataset(dataset, sides, "train", seed)`."""
    from distributed_cl.data.table import Splits

    x = dataset
    labelled = "label" in x.side_columns(sides)
    decoded = functools.partial(decoded_dataset, x, sides, seed=seed, verbose=verbose)
    test, skipped, examples = materialize(decoded(split="eval"), labelled, x.eval_max_rows)
    if len(test) < 2:
        raise ConfigError(f"dataset: the held-out split has {len(test)} rows; raise dataset.eval_fraction or give eval_path")
    rows = x.count(*x.listing()[:2])  # read once: the cache decision and the epoch length
    if should_cache(x, sides, rows):
        train, train_skipped, train_examples = materialize(decoded(split="train"), labelled)
        skipped, examples, train_rows = skipped + train_skipped, examples + train_examples, len(train)
        order = np.random.default_rng(seed).permutation(len(train))[: x.eval_bank_size]
        bank = train.take(order.tolist())
        check_skipped(skipped, skipped + len(train) + len(test), x.max_skipped_fraction, examples)
    else:
        train = None
        bank = materialize(decoded(split="train"), labelled, x.eval_bank_size)[0] if labelled else None
        train_rows = None if rows is None else rows if x.held_out_field else int(rows * (1 - x.eval_fraction))
    return Splits(train, test, bank=bank, skipped_rows=skipped, skipped_examples=examples[:5], train_rows=train_rows)


class TooManySkippedRows(ValueError):
    """More rows failed to decode than dataset.max_skipped_fraction allows."""


# The key of a stream's last report when it has too many such rows (the workers send it, the
# controller's callbacks.StopOnDataError raises TooManySkippedRows from it).
DATA_ERROR = "data_error"


def skipped_rows_error(skipped: int, total: int, limit: float, examples: list[str]) -> str | None:
    """Why `skipped` of `total` rows are too many for dataset.max_skipped_fraction=`limit`, or None."""
    if total and skipped / total > limit:
        return (f"{skipped} of {total} rows ({skipped / total:.1%}) did not decode or had an empty text, more than "
                f"dataset.max_skipped_fraction={limit}; e.g. {'; '.join(examples[:5])}")
    return None


def check_skipped(skipped: int, total: int, limit: float, examples: list[str]) -> None:
    if error := skipped_rows_error(skipped, total, limit, examples):
        raise TooManySkippedRows(error)
