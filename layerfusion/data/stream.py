"""A training stream sharded across ranks and DataLoader workers with equal counts, and its epoch-aware loader."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from layerfusion.data.readers import DataError, Examples, label_str, stream_error

READ_BATCH = 1_000  # rows per Arrow batch read from the source


class ShardedStream(IterableDataset):
    """The rows of a `datasets` streaming split, shuffled per epoch, sharded over ranks x workers.

    Every rank and every DataLoader worker reads the whole source in file order (through
    `IterableDataset.iter`, so `datasets` does not split it by worker a second time), keeps the rows
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
        class_names: list[str] | None = None,
        name: str = "stream",
        buffer_size: int = 10_000,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.source = source
        self.label_names = list(label_names)
        self.index = {lab: i for i, lab in enumerate(label_names)}
        self.text_field, self.label_field = text_field, label_field
        self.seed, self.keep, self.class_names, self.name = seed, keep, class_names, name
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
        for text, value in iter_rows(self.source, self.name, self.text_field, self.label_field):
            if self.keep is None or self.keep[i]:
                yield self._item(i, text, value)
            i += 1
        if self.keep is not None and i != len(self.keep):
            raise DataError(
                f"{self.name}: the stream has {i} rows, but {len(self.keep)} were counted when it was scanned; "
                "was the file changed during training?"
            )

    def _item(self, i: int, text, value) -> dict:
        where = f"{self.name}, row {i + 1}"
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: field '{self.text_field}' must be a non-empty string, got {text!r}"
            )
        try:
            label = label_str(value, self.class_names)
        except ValueError as err:
            raise DataError(f"{where}: field '{self.label_field}' {err}") from None
        if label is None:
            raise DataError(f"{where}: field '{self.label_field}' is null or missing")
        if label not in self.index:
            raise DataError(f"{where}: label {label!r} is not among the labels {self.label_names}")
        return {"index": i, "text": text, "label": self.index[label]}


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


def scan_labels(
    source, label_field: str, class_names: list[str] | None, name: str
) -> list[str | None]:
    """The label column of a stream, as strings (one pass that reads only that column where the format allows)."""
    out: list[str | None] = []
    for _, value in iter_rows(source.select_columns([label_field]), name, None, label_field):
        try:
            out.append(label_str(value, class_names))
        except ValueError as err:
            raise DataError(f"{name}, row {len(out) + 1}: field '{label_field}' {err}") from None
    return out


def iter_rows(source, name: str, text_field: str | None, label_field: str) -> Iterator[tuple]:
    """(text, label value) of every row of a stream in file order; read errors as `DataError`."""
    try:
        for batch in source.iter(batch_size=READ_BATCH):
            texts = batch[text_field] if text_field else [None] * len(batch[label_field])
            yield from zip(texts, batch[label_field])
    except DataError:
        raise
    except Exception as err:  # the builders raise many types while streaming
        raise stream_error(name, err, text_field or "text", label_field) from err


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


def read_rows(
    source,
    rows: list[int],
    text_field: str,
    label_field: str,
    class_names: list[str] | None,
    name: str,
) -> Examples:
    """The rows at `rows` (sorted indices) of a stream, read in one pass, as `Examples`."""
    wanted = set(rows)
    texts: list[str] = []
    labels: list[str | None] = []
    for i, (text, value) in enumerate(iter_rows(source, name, text_field, label_field)):
        if i in wanted:
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"{name}, row {i + 1}: field '{text_field}' must be a non-empty string"
                )
            texts.append(text)
            labels.append(label_str(value, class_names))
    return Examples(texts, labels, name, rows=sorted(wanted))
