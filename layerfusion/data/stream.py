"""A training stream sharded across ranks and DataLoader workers with equal counts, and its epoch-aware loader."""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from layerfusion.data.readers import DataError, Examples


class ShardedStream(IterableDataset):
    """The rows of a split read one at a time, shuffled per epoch, sharded over ranks x workers.

    `source` is a `SplitSource` (anything with its `rows(text_field, label_field)`): plain data, so the
    stream pickles to DataLoader workers and `ddp_spawn` processes and opens its files there. Every rank
    and every DataLoader worker reads the whole source in file order, keeps the rows
    of `keep` (the training rows: held-out validation rows and rows outside a subset are dropped),
    shuffles them with a buffer seeded by (seed, epoch) — the same order everywhere — and keeps
    positions `i % n == slot` of `n = world_size x workers` slots. Only complete groups of `n` are
    used, so every rank yields the same number of rows (one more row on a rank would hang DDP
    collectives): the last `rows % n` rows of an epoch's order are dropped. `index` is the row's
    position in the source file.
    """

    def __init__(
        self,
        source,
        label_names: list[str],
        text_field: str,
        label_field: str,
        seed: int,
        keep: list[bool] | None = None,
        buffer_size: int = 10_000,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.source = source
        self.label_names = list(label_names)
        self.index = {lab: i for i, lab in enumerate(label_names)}
        self.text_field, self.label_field = text_field, label_field
        self.seed, self.keep = seed, keep
        self.buffer_size = buffer_size
        self.epoch = 0
        self.rank, self.world_size = rank, world_size  # None: read from torch.distributed

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for this epoch (same order on every rank and worker)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        rank, world = _rank_world() if self.rank is None else (self.rank, self.world_size or 1)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        n, slot = world * workers, rank * workers + worker
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        mine = None
        for pos, row in enumerate(_buffer_shuffle(self._kept(), self.buffer_size, rng)):
            if pos % n == slot:
                mine = row
            if pos % n == n - 1:
                yield mine

    def _kept(self) -> Iterator[dict]:
        """Training rows in file order: `{index, text, label}` with the label as a class id."""
        i = 0
        for i, row in enumerate(self.source.rows(self.text_field, self.label_field), 1):
            if self.keep is None or self.keep[i - 1]:
                if row.label not in self.index:
                    raise DataError(
                        f"{row.where}: label {row.label!r} is not among the labels {self.label_names}"
                    )
                yield {"index": i - 1, "text": row.text, "label": self.index[row.label]}
        if self.keep is not None and i != len(self.keep):
            raise DataError(
                f"{self.source.location}: the stream has {i} rows, but {len(self.keep)} were counted when it "
                "was scanned; was the file changed during training?"
            )


class StreamLoader(DataLoader):
    """A DataLoader over a `ShardedStream` that sets the stream's epoch each time it is iterated.

    Lightning calls `set_epoch` on samplers only, never on an `IterableDataset`: `epoch` (the trainer's
    current epoch) is read at `iter()`, before workers copy the stream; without it, iterations count.
    """

    def __init__(
        self, dataset: ShardedStream, epoch: Callable[[], int | None] | None = None, **kwargs
    ) -> None:
        super().__init__(dataset, **kwargs)
        self._epoch_fn = epoch
        self._iterations = 0

    def __iter__(self):
        epoch = self._epoch_fn() if self._epoch_fn is not None else None
        self.dataset.set_epoch(self._iterations if epoch is None else epoch)
        self._iterations += 1
        return super().__iter__()


def scan_labels(source, text_field: str, label_field: str) -> list[str]:
    """The label column of a split in one pass, one row at a time (each distinct label one string object)."""
    same: dict[str, str] = {}
    return [same.setdefault(row.label, row.label) for row in source.rows(text_field, label_field)]


def _buffer_shuffle(rows: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of `size` rows (the same order for the same `rng` state)."""
    buffer: list[dict] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = row
    rng.shuffle(buffer)
    yield from buffer


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def read_rows(source, rows: list[int], text_field: str, label_field: str) -> Examples:
    """The rows at `rows` (row indices) of a split, read in one pass, as `Examples` that know where each is."""
    wanted = set(rows)
    texts: list[str] = []
    labels: list[str | None] = []
    lines = array("q")
    parts: list[tuple[str, int]] = []
    for i, row in enumerate(source.rows(text_field, label_field)):
        if not parts or parts[-1][0] != row.source:
            parts.append((row.source, i))
        lines.append(row.line)
        if i in wanted:
            texts.append(row.text)
            labels.append(row.label)
    return Examples(texts, labels, source.name, lines, tuple(parts), sorted(wanted))
