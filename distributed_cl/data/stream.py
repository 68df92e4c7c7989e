"""Worker side of a streamed dataset: this worker's parts of Ray Data's split, as local batches of
decoded rows, the same number from each part.

- **Parts, not ranks.** Ray Data splits the stream into parts (one a worker, or in an elastic run
  as many as the most workers it can have), and each worker reads a run of consecutive parts
  (`PartRun`; where the parts do not divide evenly, some workers read one more). Everything
  about a part (its rows, its shuffle, its groups) is seeded by the part's index, not the
  worker's: a global batch, part 0's rows then part 1's and so on, is the same whatever the
  number of workers that read them, and a run that resumes on another number resumes at the
  same rows.
- **Same shape on every part.** Ray Data's `streaming_split(equal=True)` gives every part the
  same number of rows; rows that failed to decode are dropped here (and counted), and the
  loop stops an epoch for every worker as soon as one has no full batch left
  (`distributed.all_ranks`). The epoch's remainder (fewer than one batch per part, plus at most
  parts - 1 rows the split drops, plus with labels the rows that never completed a group) is not
  trained on; `dropped_rows` counts it.
- **Positives under labelled losses.** With `m`, each part holds rows back per label until m of
  one label are in; such a group of m enters the part's pool of groups, and each batch draws
  part_batch_size / m groups from the pool at random. Every batch of every part (so every
  global batch) then holds at least m rows of each label it contains. Cost: up to m - 1 rows per
  label wait in memory (at most `max_pending` rows a part; past it the oldest label's rows are
  dropped and counted), and rows of a label that never reaches m in an epoch are dropped.
- **Deterministic and resumable.** With Ray Data's `preserve_order`, the rows of a part come in
  the same order for the same data and seed; the shuffle buffer and the group draws are seeded by
  (seed, epoch, part). Resuming mid-epoch regenerates the epoch and skips its first `start_batch`
  batches (decoded again, not trained on): no row is repeated or skipped.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_cl.data.table import Table

ERROR = "error"  # the decode stage's column: "" for a good row, else "<file or key>: <reason>"
MAX_EXAMPLES = 5


@dataclass
class PartRun:
    """A worker's consecutive parts of the stream, `first` the index of the first: Ray Data's
    iterators (DataIterator), each one part of its split."""

    first: int
    parts: list[Any]


def part_runs(parts: int, world: int) -> list[range]:
    """The consecutive parts each of `world` workers reads: as even as they divide, the first
    workers one more where they do not."""
    size, more = divmod(parts, world)
    starts = [rank * size + min(rank, more) for rank in range(world + 1)]
    return [range(starts[rank], starts[rank + 1]) for rank in range(world)]


class OnItsOwnThread:
    """An iterator run on a thread of its own, a few items ahead; `close()` stops it (the thread
    closes it). Its exception is raised where the items are taken."""

    AHEAD = 2

    def __init__(self, iterator: Iterator) -> None:
        self.items: queue.Queue = queue.Queue(self.AHEAD)
        self.stopped, self.ended = threading.Event(), False
        self.thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self.thread.start()

    def _run(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put((item, None)):
                    return
            self._put((StopIteration, None))
        except BaseException as error:  # noqa: BLE001 (raised on the taking side)
            self._put((StopIteration, error))
        finally:
            iterator.close()

    def _put(self, entry: tuple) -> bool:
        while not self.stopped.is_set():
            try:
                self.items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> OnItsOwnThread:
        return self

    def __next__(self):
        if self.ended:
            raise StopIteration
        item, error = self.items.get()
        if error is not None:
            raise error
        if item is StopIteration:
            self.ended = True
            raise StopIteration
        return item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=60)


class StreamBatches:
    """Local batches of `part_batch_size` rows from each part of `run`, concatenated in part order."""

    def __init__(self, run: PartRun, part_batch_size: int, seed: int, labelled: bool,
                 shuffle_buffer: int = 0, m: int | None = None, read_batch: int = 256) -> None:
        if m is not None and part_batch_size % m:
            raise ValueError(f"the {part_batch_size} rows a batch takes from each part of the stream are not a "
                             f"multiple of m={m}")
        self.run, self.part_batch_size, self.seed = run, part_batch_size, seed
        self.local_batch_size = part_batch_size * len(run.parts)
        self.labelled, self.shuffle_buffer, self.m, self.read_batch = labelled, shuffle_buffer, m, read_batch
        self.max_pending = 64 * part_batch_size
        self.rows_seen = self.skipped_rows = self.dropped_rows = 0
        self.skipped_examples: list[str] = []
        self.counting = threading.Lock()

    def _rows(self, part: int, epoch: int) -> Iterator[Table]:
        """Part `part`'s good rows for `epoch`, in decoded batches; bad rows counted and dropped."""
        for batch in self.run.parts[part - self.run.first].iter_batches(
                batch_size=self.read_batch, batch_format="numpy", prefetch_batches=2,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=int(np.random.SeedSequence([self.seed, epoch, part]).generate_state(1)[0])
                if self.shuffle_buffer else None):
            errors = batch.pop(ERROR)
            bad = errors != ""
            with self.counting:  # (several parts: each on a thread of its own)
                self.rows_seen += len(errors)
                if bad.any():
                    self.skipped_rows += int(bad.sum())
                    room = MAX_EXAMPLES - len(self.skipped_examples)
                    self.skipped_examples += [str(e) for e in errors[bad][:max(room, 0)]]
            if bad.any():
                batch = {k: v[~bad] for k, v in batch.items()}
            if len(batch["label"]):
                yield Table.from_numpy(batch, self.labelled)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Table]:
        """This worker's local batches of `epoch`, from batch `start_batch` on, until one of its
        parts runs out. The counters (rows_seen, skipped_rows, dropped_rows) restart with every
        epoch: a resumed epoch counts its regenerated first batches again, so each epoch's counts
        are whole once it ends."""
        self.rows_seen = self.skipped_rows = self.dropped_rows = 0
        self.skipped_examples = []
        parts = range(self.run.first, self.run.first + len(self.run.parts))
        streams = [self._grouped(part, epoch) if self.m else self._chunked(part, epoch) for part in parts]
        if len(streams) > 1:  # Ray Data starts a split's epoch once every part has asked: ask at once
            streams = [OnItsOwnThread(stream) for stream in streams]
        try:
            for i in itertools.count():
                batches = [next(stream, None) for stream in streams]
                if None in batches:  # a part ran out: the others' rows of this batch, and their rest, dropped
                    rest = [rows for stream in streams for rows in stream]
                    with self.counting:
                        self.dropped_rows += sum(len(rows) for rows in batches + rest if rows is not None)
                    return
                if i >= start_batch:
                    yield Table.concat(batches)
        finally:
            for stream in streams:
                stream.close()

    def _chunked(self, part: int, epoch: int) -> Iterator[Table]:
        pending, size = [], 0
        for rows in self._rows(part, epoch):
            pending.append(rows)
            size += len(rows)
            while size >= self.part_batch_size:
                table = Table.concat(pending)
                yield table.head(self.part_batch_size)
                rest = table.take(range(self.part_batch_size, len(table)))
                pending, size = ([rest] if len(rest) else []), len(rest)
        with self.counting:
            self.dropped_rows += size

    def _grouped(self, part: int, epoch: int) -> Iterator[Table]:
        m, per_batch = self.m, self.part_batch_size // self.m
        rng = np.random.default_rng([self.seed, epoch, part, 1])
        pool_size = max(2 * per_batch, self.shuffle_buffer // m)
        waiting: collections.OrderedDict[int, list[Table]] = collections.OrderedDict()  # label -> rows, oldest first
        pending = 0
        groups: list[Table] = []
        for rows in self._rows(part, epoch):
            for i in range(len(rows)):
                label = int(rows.labels[i])
                waiting.setdefault(label, []).append(rows.take([i]))
                pending += 1
                if len(waiting[label]) == m:
                    groups.append(Table.concat(waiting.pop(label)))
                    pending -= m
                if pending > self.max_pending:  # bounded memory: the oldest waiting label gives up its rows
                    _, dropped = waiting.popitem(last=False)
                    pending -= len(dropped)
                    with self.counting:
                        self.dropped_rows += len(dropped)
            while len(groups) >= pool_size:
                yield self._draw(groups, per_batch, rng)
        while len(groups) >= per_batch:  # the pool's tail
            yield self._draw(groups, per_batch, rng)
        with self.counting:
            self.dropped_rows += pending + m * len(groups)

    @staticmethod
    def _draw(groups: list[Table], k: int, rng: np.random.Generator) -> Table:
        chosen = sorted(rng.choice(len(groups), size=k, replace=False).tolist(), reverse=True)
        batch = Table.concat([groups.pop(i) for i in chosen])
        return batch.take(torch.from_numpy(rng.permutation(len(batch))))  # classes mixed within the batch
