"""Hugging Face datasets on disk, for `dataset.format: huggingface` (formats.py): the directories
`datasets`' save_to_disk writes, read with pyarrow alone, and the download of a Hub dataset into
such a directory.

save_to_disk writes a Dataset as `state.json` (its Arrow files, in order, under `_data_files`),
`dataset_info.json` and Arrow IPC stream files `data-XXXXX-of-YYYYY.arrow`; a DatasetDict as
`dataset_dict.json` (`{"splits": [...]}`) with a Dataset directory per split. Files in the
directory that state.json does not list (the `cache-*.arrow` of a later `.map`) are not the data.

Reading streams: Ray Data runs one read task per Arrow file, which yields the file's record
batches in order; the driver reads only state.json and each file's schema (and, to count rows,
the batch headers of local files, memory-mapped)."""

from __future__ import annotations

import functools
import json
import os
import shutil

from distributed_cl.options import ConfigError

DATASET_DICT, STATE = "dataset_dict.json", "state.json"
INSTALL = "pip install 'distributed_cl[hf]'"


def filesystem(location: str):
    """(pyarrow filesystem, path on it) of a local path or an s3:// / gs:// / file:// URI."""
    import pyarrow.fs as pafs

    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def is_hub_name(path: str) -> bool:
    """Whether `path` can only be a Hub dataset's name: neither a URI nor a local path that exists."""
    return "://" not in path and not os.path.exists(os.path.expanduser(path))


def _json(fs, path: str):
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def split_files(location: str, split: str, field: str, split_field: str, whole: bool = True):
    """(filesystem, the Arrow files of the data, in order, its directory) of the save_to_disk
    directory `location`: a DatasetDict's `split`, or a Dataset read whole (where `whole`; else an
    error of `split_field`, which then names another part of the data)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    root = root.rstrip("/")
    info = fs.get_file_info([f"{root}/{STATE}", f"{root}/{DATASET_DICT}", root])
    if info[1].type == pafs.FileType.File:
        splits = _json(fs, f"{root}/{DATASET_DICT}").get("splits", [])
        if split not in splits:
            raise ConfigError(f"{split_field}: {split!r} is not a split of {location} (its splits: {', '.join(splits)})")
        root = f"{root}/{split}"
    elif info[0].type != pafs.FileType.File:
        what = "does not exist" if info[2].type == pafs.FileType.NotFound else "is not a directory save_to_disk wrote"
        raise ConfigError(f"{field}: {location} {what} (no {STATE} or {DATASET_DICT})")
    elif not whole:
        raise ConfigError(f"{split_field}={split} needs a DatasetDict (splits); {location} is one Dataset")
    files = [f"{root}/{entry['filename']}" for entry in _json(fs, f"{root}/{STATE}")["_data_files"]]
    if not files:
        raise ConfigError(f"{field}: {root}/{STATE} lists no Arrow files")
    return fs, files, root


def columns(fs, files) -> list[str]:
    """The columns of the data: the schema at the head of its first Arrow file."""
    import pyarrow as pa

    with fs.open_input_stream(files[0]) as f:
        return pa.ipc.open_stream(f).schema.names


def count(fs, files) -> int | None:
    """Rows, from the record batches' headers of local files (memory-mapped, the data not read);
    None behind a URI, where it would be read."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    total = 0
    for path in files:
        with pa.memory_map(path) as f:
            total += sum(batch.num_rows for batch in pa.ipc.open_stream(f))
    return total


def read(fs, files, shuffle):
    """ray.data.Dataset of the rows, with a "path" column: one read task per file (in the order of
    `files`, or shuffled by Ray Data's FileShuffleConfig `shuffle`), each yielding the file's record
    batches in order."""
    import ray.data

    source = _datasource()(files, filesystem=fs, include_paths=True, shuffle=shuffle)
    return ray.data.read_datasource(source, override_num_blocks=len(files))


@functools.cache
def _datasource():
    """The Ray Data datasource of Arrow IPC stream files (Ray Data reads Arrow's file format only
    through other formats), made on first use: importing Ray Data takes a second."""
    from ray.data.datasource import FileBasedDatasource

    class ArrowStreamDatasource(FileBasedDatasource):
        _FILE_EXTENSIONS = ["arrow"]

        def _read_stream(self, f, path: str):
            import pyarrow as pa

            for batch in pa.ipc.open_stream(f):
                yield plain(pa.Table.from_batches([batch]))

    return ArrowStreamDatasource


def plain(table):
    """`datasets`' Image (and Audio) columns, struct<bytes, path>, as their bytes: what the decoder
    reads as an encoded image. (An image saved as a path alone has no bytes: a skipped row.)"""
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, field in enumerate(table.schema):
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            table = table.set_column(i, field.name, pc.struct_field(table.column(i), "bytes"))
    return table.replace_schema_metadata(None)


# ----------------------------------------------------------------------------- the Hub


def hub_copy(cache_dir: str, name: str, subset: str | None, split: str) -> str:
    """Where a Hub dataset's split is saved (a save_to_disk directory of one Dataset)."""
    return os.path.join(os.path.expanduser(cache_dir), name.replace("/", "--"), subset or "default", split)


def download(name: str, subset: str | None, split: str, cache_dir: str) -> str:
    """A Hub dataset's split loaded with `datasets.load_dataset` and saved under `cache_dir`, unless
    an earlier run saved it; its directory. On the driver, before Ray starts."""
    target = hub_copy(cache_dir, name, subset, split)
    if os.path.isfile(os.path.join(target, STATE)):
        return target
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"dataset.path: downloading the Hub dataset {name} needs the datasets package: "
                          f"{INSTALL}") from None
    try:
        data = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # no network, no such dataset, subset or split
        raise ConfigError(f"dataset.path: cannot download the Hub dataset {name} (dataset.subset={subset}, "
                          f"dataset.split={split}): {type(e).__name__}: {e}"[:1000]) from None
    partial = target + ".partial"  # renamed when complete: an interrupted download is not taken for the data
    shutil.rmtree(partial, ignore_errors=True)
    data.save_to_disk(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target
