"""Test helper callback for the DDP tests: what each rank trained on, and its head at the end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class RecordRanks(L.Callback):
    """Write `rank{r}.json`: the train row indices of every epoch and a SHA-256 of the head after fit."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.rows: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        h = hashlib.sha256()
        for k, v in sorted(pl_module.head.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "rows": self.rows,
            "head": h.hexdigest(),
            "world": trainer.world_size,
            "val_acc": float(trainer.callback_metrics["val_acc"]),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
