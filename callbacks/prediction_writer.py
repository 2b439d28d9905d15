"""Write `predict` results as JSON Lines, streamed in row order: text, predicted label, class probabilities."""

from __future__ import annotations

import heapq
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from layerfusion.files import owner_tag, remove_dead_leftovers, remove_temp_leftovers, temp_path


class PredictionWriter(BasePredictionWriter):
    """Write one JSON object per predicted row to `path`, in input row order, as batches complete.

    A row is `{"text", "label", "probs": {class: probability}, "gold"}` (`gold` only where the input row
    has a label). Each batch's rows are written out as soon as the batch is predicted, so memory does not
    grow with the output. They go to a temporary file that is renamed to `path` at the end of the epoch:
    a failed run leaves the previous file or none, never a partial one. Under DDP each rank writes its own
    part file (row numbers first) and rank 0 merges the parts in row order (a k-way merge of the ranks'
    sorted parts), so `path`'s directory must be on a filesystem every rank sees, like the feature cache.

    Each rank must predict its rows once each and in increasing row order (the datamodule's evaluation
    loaders do: rows `rank::world`, in order); a repeated or out-of-order row stops every rank with an
    error at the end of the epoch. `trainer.predict(..., return_predictions=False)` keeps Lightning from
    also holding every batch's output in memory (the `predict` subcommand passes it).

    Args:
        path: output file.
    """

    def __init__(self, path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._out: IO[str] | None = (
            None  # this rank's part (or, in one process, the temporary output)
        )
        self._parts: Path | None = None  # the directory of the ranks' parts (DDP)
        self._last = -1  # the last row written by this rank
        self._problem: str | None = None  # a bad row order seen on this rank, raised at epoch end

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        self._texts, self._gold = dm.texts("predict"), dm.splits["predict"].labels
        self._names = list(pl_module.label_names)
        self._last, self._problem = -1, None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            self.remove_leftovers()
        if trainer.world_size == 1:
            self._parts = None
            tmp = temp_path(self.path)
        else:  # one directory for this run's parts, named by rank 0 (its owner, for leftovers cleanup)
            run = trainer.strategy.broadcast(
                f"{_parts_prefix(self.path)}{os.getpid()}-{uuid.uuid4().hex[:16]}", src=0
            )
            self._parts = self.path.with_name(run)
            self._parts.mkdir(exist_ok=True)
            tmp = self._parts / f"rank{trainer.global_rank}.jsonl"
        self._out = open(tmp, "w", encoding="utf-8")

    def remove_leftovers(self) -> list[Path]:
        """Remove the temporary outputs and part directories that killed runs of this host left beside
        `path` (those of live processes stay); return them."""
        parts = remove_dead_leftovers(self.path.parent, _parts_prefix(self.path))
        return remove_temp_leftovers(self.path) + parts

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        numbered = self._parts is not None
        for i, p in zip(prediction["index"].tolist(), prediction["probs"].cpu().tolist()):
            if i <= self._last:
                self._problem = self._problem or (
                    f"PredictionWriter: rank {trainer.global_rank} predicted row {i} after row "
                    f"{self._last}: each rank must predict its rows once each, in increasing order "
                    "(a sampler repeated or shuffled rows)"
                )
                continue
            self._last = i
            line = self.row(i, p)
            self._out.write(f"{i}\t{line}\n" if numbered else f"{line}\n")
        self._out.flush()

    def row(self, i: int, probs: list[float]) -> str:
        """The JSON line of row `i` with class probabilities `probs`."""
        names = self._names
        row = {
            "text": self._texts[i],
            "label": names[max(range(len(probs)), key=probs.__getitem__)],
            "probs": dict(zip(names, probs)),
        }
        if self._gold[i] is not None:
            row["gold"] = self._gold[i]
        return json.dumps(row, ensure_ascii=False)

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tmp = Path(self._out.name)
        self._out.close()
        strategy = trainer.strategy
        # every rank learns of a problem on any rank, and all stop together
        flag = torch.tensor(float(self._problem is not None), device=strategy.root_device)
        if strategy.reduce(flag, reduce_op="sum").item() > 0:
            self._discard(trainer)
            raise RuntimeError(
                self._problem or "PredictionWriter: another rank failed (see its error)"
            )
        if self._parts is None:
            os.replace(tmp, self.path)
            self._out = None
            return
        strategy.barrier("layerfusion-predictions")
        problem = None
        if trainer.is_global_zero:
            try:
                problem = self._merge(trainer.world_size)
            except (
                Exception
            ) as err:  # e.g. a full disk: every rank must learn of it, not only rank 0
                problem = f"PredictionWriter: rank 0 could not write {self.path}: {type(err).__name__}: {err}"
        problem = strategy.broadcast(problem, src=0)
        self._discard(trainer)
        self._out = None
        if problem is not None:
            raise RuntimeError(problem)

    def _merge(self, world: int) -> str | None:
        """Rank 0: merge the ranks' parts in row order into `path` (via a temporary file); a problem or None."""
        parts = [self._parts / f"rank{r}.jsonl" for r in range(world)]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            return (
                f"PredictionWriter: no part file {missing} of another rank in {self._parts}: under DDP "
                f"{self.path.parent} must be on a filesystem every rank sees"
            )
        tmp = temp_path(self.path)
        handles = [open(p, encoding="utf-8") for p in parts]
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                last = None
                for line in heapq.merge(*handles, key=_row_number):
                    number, _, text = line.partition("\t")
                    if number == last:
                        return f"PredictionWriter: row {number} was predicted by two ranks (a sampler repeated rows)"
                    last = number
                    out.write(text)
            os.replace(tmp, self.path)
        finally:
            for h in handles:
                h.close()
            tmp.unlink(missing_ok=True)
        return None

    def _discard(self, trainer: L.Trainer) -> None:
        """Remove this rank's temporary output (rank 0: the parts directory too, after every rank's part)."""
        if self._out is not None and not self._out.closed:
            self._out.close()
        if self._out is not None:
            Path(self._out.name).unlink(missing_ok=True)
        if self._parts is not None and trainer.is_global_zero:
            shutil.rmtree(self._parts, ignore_errors=True)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._out is not None:
            self._discard(trainer)
            self._out = None


def _row_number(line: str) -> int:
    return int(line.partition("\t")[0])


def _parts_prefix(path: Path) -> str:
    """The name prefix of this host's DDP part directories for `path`."""
    return f".{path.name}.parts-{owner_tag()}-"
