"""Per-row predictions, per-class F1, confusion matrix and gate weights of val/test, as files and logger
entries."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from layerfusion.callbacks.tracking import gather_rows, log_image, log_metrics, log_table, run_dir
from typing_extensions import override

from layerfusion import plots
from layerfusion.analysis import write_predictions
from layerfusion.files import write_csv, write_json


class EvalPredictions(L.Callback):
    """Write `<default_root_dir>/predictions_<split>.csv` (`index,pred,gold`, sorted by row index: what
    `layerfusion analyze` reads) after every validation and test epoch, and keep the rows.

    Rows are gathered from every rank (each row is evaluated on exactly one rank) and sorted by row index;
    after an epoch, `rows[split]` holds them (`[N, 3]` int64: index, gold, prediction) and `gates[split]`
    the gated head's gate weights of each row (`[N, encoders]`, no columns for other heads), on every rank.
    The sanity check's validation is not recorded.

    Args:
        splits: which evaluation splits to record (`val`, `test`).
    """

    def __init__(self, splits: tuple[str, ...] = ("val", "test")) -> None:
        bad = set(splits) - {"val", "test"}
        if bad:
            raise ValueError(
                f"{type(self).__name__} splits must be 'val' and/or 'test', got {sorted(bad)}"
            )
        self.splits = tuple(splits)
        self.rows: dict[str, np.ndarray] = {}
        self.gates: dict[str, np.ndarray] = {}
        self._batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @override
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._batches["val"] = []

    @override
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._batches["test"] = []

    @override
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._collect("val", pl_module, outputs, batch)

    @override
    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._collect("test", pl_module, outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._finish("val", trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish("test", trainer, pl_module)

    def _collect(self, split: str, pl_module, outputs, batch) -> None:
        if split not in self.splits or outputs is None:
            return
        gate = getattr(pl_module.head, "last_gate", None)
        n = len(batch["labels"])
        gate = (
            gate.float()
            if gate is not None and len(gate) == n
            else torch.zeros(n, 0, device=batch["labels"].device)
        )
        cols = (batch["index"], batch["labels"], outputs["preds"])
        ids = torch.stack([c.long() for c in cols], dim=1)
        self._batches[split].append((ids, gate))  # row numbers stay exact (int64) beyond 2**24

    def _finish(self, split: str, trainer: L.Trainer, pl_module) -> None:
        """Gather the epoch's rows (call on every rank); rank 0 writes them and calls `on_rows`."""
        if split not in self.splits or not self._batches.get(split):
            return
        batches = self._batches.pop(split)
        rows = gather_rows(pl_module, torch.cat([i for i, _ in batches])).cpu().numpy()
        gate = torch.cat([g for _, g in batches])
        gate = (
            (gather_rows(pl_module, gate) if gate.shape[1] else gate.new_zeros(len(rows), 0))
            .cpu()
            .numpy()
        )
        _, first = np.unique(rows[:, 0], return_index=True)
        if len(first) != len(rows):  # checked on every rank, so that every rank stops
            raise RuntimeError(
                f"{split}: {len(rows)} rows for {len(first)} row indices: rows repeated"
            )
        self.rows[split], self.gates[split] = rows[first], gate[first]
        if trainer.is_global_zero:
            index, gold, pred = self.rows[split].T
            write_predictions(run_dir(trainer) / f"predictions_{split}.csv", index, pred, gold)
            self.on_rows(split, trainer, pl_module)

    def on_rows(self, split: str, trainer: L.Trainer, pl_module) -> None:
        """Called on rank 0 once `rows[split]` and `gates[split]` hold a finished epoch's rows."""


class RunReport(EvalPredictions):
    """Write `<default_root_dir>/{run.json, metrics_<split>.json, metrics_<split>.csv,
    predictions_<split>.csv, confusion_<split>.png, gates_<split>.png}` and log the same to the loggers
    (W&B: images and tables).

    `run.json` describes the run (dataset, head, encoders, selected layers); `metrics_<split>` holds
    loss, accuracy, macro-F1, per-class F1 and the mean gate weight per encoder (gated head);
    `predictions_<split>.csv` the prediction of every row (`EvalPredictions`), so `layerfusion report`
    and `layerfusion analyze` both read the run directory of a `fit` + `test`.
    Rows are gathered from every rank (each row is evaluated on exactly one rank) and sorted by row index.

    Args:
        splits: which evaluation splits to report (`val`, `test`).
    """

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            dm = trainer.datamodule
            write_json(
                run_dir(trainer) / "run.json",
                {
                    "dataset": getattr(dm, "dataset", None),
                    "head": pl_module.hparams.head,
                    "encoders": [e["name"] for e in pl_module.hparams.encoders],
                    "layers": pl_module.selection,
                    "label_names": pl_module.label_names,
                },
            )

    @override
    def on_rows(self, split: str, trainer: L.Trainer, pl_module) -> None:
        rows, gate = self.rows[split], self.gates[split]
        names = pl_module.label_names
        matrix = np.zeros((len(names), len(names)), dtype=np.int64)
        np.add.at(matrix, (rows[:, 1], rows[:, 2]), 1)
        per_class = _per_class_f1(matrix)
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}_")
        }
        metrics.update({f"{split}_f1_{name}": f for name, f in zip(names, per_class)})
        gates = gate.mean(0) if gate.shape[1] else []
        metrics.update(
            {f"{split}_gate_{enc}": float(g) for enc, g in zip(pl_module.encoders, gates)}
        )
        metrics["epoch"] = trainer.current_epoch
        out = run_dir(trainer)
        write_json(
            out / f"metrics_{split}.json",
            {**metrics, "rows": int(len(rows)), "confusion_matrix": matrix.tolist()},
        )
        write_csv(
            out / f"metrics_{split}.csv", [{"metric": k, "value": v} for k, v in metrics.items()]
        )
        log_metrics(trainer, {k: v for k, v in metrics.items() if "_f1_" in k or "_gate_" in k})
        self._figures(split, trainer, matrix, names, per_class, gates, list(pl_module.encoders))

    def _figures(self, split, trainer, matrix, names, per_class, gates, encoders) -> None:
        out = run_dir(trainer)
        cm = plots.confusion_matrix(
            matrix, names, out / f"confusion_{split}.png", title=f"{split} confusion matrix"
        )
        log_image(trainer, f"{split}/confusion_matrix", cm)
        log_table(
            trainer,
            f"{split}/per_class_f1",
            [{"label": n, "f1": f} for n, f in zip(names, per_class)],
        )
        if len(gates):
            g = plots.bars(
                encoders,
                [float(x) for x in gates],
                out / f"gates_{split}.png",
                "mean gate weight",
                f"{split}: gate weight per encoder",
            )
            log_image(trainer, f"{split}/gate_weights", g)


def _per_class_f1(matrix: np.ndarray) -> list[float]:
    tp = np.diag(matrix).astype(float)
    precision = tp / np.clip(matrix.sum(0), 1, None)
    recall = tp / np.clip(matrix.sum(1), 1, None)
    return [
        float(x)
        for x in np.where(
            precision + recall > 0,
            2 * precision * recall / np.clip(precision + recall, 1e-12, None),
            0.0,
        )
    ]
