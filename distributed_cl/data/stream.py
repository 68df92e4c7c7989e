"""Worker side of a streamed dataset: this worker's shard of Ray Data's split, as local batches of
exactly `local_batch_size` decoded rows.

- **Same shape on every rank.** Ray Data's `streaming_split(equal=True)` gives every worker the
  same number of rows; rows that failed to decode are dropped here (and counted), and the
  loop stops an epoch for every worker as soon as one has no full batch left
  (`distributed.all_ranks`). The epoch's remainder (fewer than one local batch per worker, plus
  at most num_workers - 1 rows the split drops, plus with labels the rows that never completed
  a group) is not trained on; `dropped_rows` counts it.
- **Positives under labelled losses.** With `m`, rows are held back per label until m of one
  label are in; such a group of m enters a pool of groups, and each local batch draws
  local_batch_size / m groups from the pool at random. Every local batch (so every global batch)
  then holds at least m rows of each label it contains. Cost: up to m - 1 rows per label wait
  in memory (at most `max_pending` rows; past it the oldest label's rows are dropped and
  counted), and rows of a label that never reaches m in an epoch are dropped.
- **Deterministic and resumable.** With Ray Data's `preserve_order`, the rows of a worker's
  shard come in the same order for the same data and seed; the shuffle buffer and the group
  draws are seeded by (seed, epoch, rank). Resuming mid-epoch regenerates the epoch and skips
  its first `start_batch` batches (decoded again, not trained on): no row is repeated or skipped.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np
import torch

from distributed_cl.data.table import Table

ERROR = "error"  # the decode stage's column: "" for a good row, else "<file or key>: <reason>"
MAX_EXAMPLES = 5


class StreamBatches:
    def __init__(self, shard, local_batch_size: int, seed: int, rank: int, labelled: bool,
                 shuffle_buffer: int = 0, m: int | None = None, read_batch: int = 256) -> None:
        if m is not None and local_batch_size % m:
            raise ValueError(f"the local batch of {local_batch_size} is not a multiple of m={m}")
        self.shard, self.local_batch_size, self.seed, self.rank = shard, local_batch_size, seed, rank
        self.labelled, self.shuffle_buffer, self.m, self.read_batch = labelled, shuffle_buffer, m, read_batch
        self.max_pending = 64 * local_batch_size
        self.rows_seen = self.skipped_rows = self.dropped_rows = 0
        self.skipped_examples: list[str] = []

    def _rows(self, epoch: int) -> Iterator[Table]:
        """The shard's good rows for `epoch`, in decoded batches; bad rows counted and dropped."""
        for batch in self.shard.iter_batches(
                batch_size=self.read_batch, batch_format="numpy", prefetch_batches=2,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0])
                if self.shuffle_buffer else None):
            errors = batch.pop(ERROR)
            bad = errors != ""
            self.rows_seen += len(errors)
            if bad.any():
                self.skipped_rows += int(bad.sum())
                room = MAX_EXAMPLES - len(self.skipped_examples)
                self.skipped_examples += [str(e) for e in errors[bad][:max(room, 0)]]
                batch = {k: v[~bad] for k, v in batch.items()}
            if len(batch["label"]):
                yield Table.from_numpy(batch, self.labelled)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Table]:
        """This worker's local batches of `epoch`, from batch `start_batch` on. The counters
        (rows_seen, skipped_rows, dropped_rows) restart with every epoch: a resumed epoch counts
        its regenerated first batches again, so each epoch's counts are whole once it ends."""
        self.rows_seen = self.skipped_rows = self.dropped_rows = 0
        self.skipped_examples = []
        batches = self._grouped(epoch) if self.m else self._chunked(epoch)
        for i, batch in enumerate(batches):
            if i >= start_batch:
                yield batch

    def _chunked(self, epoch: int) -> Iterator[Table]:
        pending, size = [], 0
        for rows in self._rows(epoch):
            pending.append(rows)
            size += len(rows)
            while size >= self.local_batch_size:
                table = Table.concat(pending)
                yield table.head(self.local_batch_size)
                rest = table.take(range(self.local_batch_size, len(table)))
                pending, size = ([rest] if len(rest) else []), len(rest)
        self.dropped_rows += size

    def _grouped(self, epoch: int) -> Iterator[Table]:
        m, per_batch = self.m, self.local_batch_size // self.m
        rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
        pool_size = max(2 * per_batch, self.shuffle_buffer // m)
        waiting: collections.OrderedDict[int, list[Table]] = collections.OrderedDict()  # label -> rows, oldest first
        pending = 0
        groups: list[Table] = []
        for rows in self._rows(epoch):
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
                    self.dropped_rows += len(dropped)
            while len(groups) >= pool_size:
                yield self._draw(groups, per_batch, rng)
        while len(groups) >= per_batch:  # the pool's tail
            yield self._draw(groups, per_batch, rng)
        self.dropped_rows += pending + m * len(groups)

    @staticmethod
    def _draw(groups: list[Table], k: int, rng: np.random.Generator) -> Table:
        chosen = sorted(rng.choice(len(groups), size=k, replace=False).tolist(), reverse=True)
        batch = Table.concat([groups.pop(i) for i in chosen])
        return batch.take(torch.from_numpy(rng.permutation(len(batch))))  # classes mixed within the batch
