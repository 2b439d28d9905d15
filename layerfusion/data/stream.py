"""A training stream sharded across ranks and DataLoader workers with equal counts."""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset, get_worker_info


class ShardedStream(IterableDataset):
    """Round-robin shard of a `datasets` streaming split: slot `s` of `n` keeps rows `i % n == s`.

    Rows are read in groups of `n` (ranks x workers) and only complete groups are used, so every
    rank yields the same number of rows (a rank with one row more would hang DDP collectives);
    the last `rows % n` rows of an epoch are dropped. Every rank shuffles with the same seed
    (a buffer shuffle, reseeded per epoch with `set_epoch`), so the slots partition the stream.
    """

    def __init__(
        self,
        source,
        label_names: list[str],
        text_field: str,
        label_field: str,
        seed: int,
        limit: int | None = None,
        buffer_size: int = 10_000,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.source = source
        self.index = {lab: i for i, lab in enumerate(label_names)}
        self.text_field, self.label_field = text_field, label_field
        self.seed, self.limit, self.buffer_size = seed, limit, buffer_size
        self.epoch = 0
        self.rank, self.world_size = rank, world_size  # None: read from torch.distributed

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for this epoch (same order on every rank)."""
        self.epoch = epoch

    def __iter__(self):
        rank, world = _rank_world() if self.rank is None else (self.rank, self.world_size or 1)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        n, slot = world * workers, rank * workers + worker
        stream = self.source.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        stream.set_epoch(self.epoch)
        if self.limit is not None:
            stream = stream.take(self.limit)
        mine = None
        for i, row in enumerate(stream):
            if i % n == slot:
                mine = row
            if i % n == n - 1:
                yield self._item(mine, i - (n - 1) + slot)

    def _item(self, row: dict, position: int) -> dict:
        label = str(row[self.label_field])
        if label not in self.index:
            raise ValueError(
                f"stream row {position}: label {label!r} is not among the labels {list(self.index)}"
            )
        return {"index": position, "text": row[self.text_field], "label": self.index[label]}


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
