"""Write `predict` results as JSON Lines: text, predicted label, class probabilities."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from layerfusion.tracking import gather_rows


class PredictionWriter(BasePredictionWriter):
    """Write one JSON object per predicted row to `path` (rank 0 gathers every rank's rows).

    Args:
        path: output file; written to a temporary file and renamed, so a failed run leaves no partial file.
    """

    def __init__(self, path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    @override
    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices
    ) -> None:
        index = torch.cat([p["index"] for p in predictions]).cpu()
        probs = torch.cat([p["probs"] for p in predictions]).cpu()
        index, probs = gather_rows(pl_module, index), gather_rows(pl_module, probs)
        if len(set(index.tolist())) != len(
            index
        ):  # checked on every rank, so that every rank stops
            raise RuntimeError(
                f"predict gave {len(index)} predictions for {len(set(index.tolist()))} distinct rows: "
                "a sampler repeated rows"
            )
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        texts, gold, names = dm.texts("predict"), dm.splits["predict"].labels, pl_module.label_names
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for i, p in sorted(zip(index.tolist(), probs.tolist())):
                row = {
                    "text": texts[i],
                    "label": names[max(range(len(p)), key=p.__getitem__)],
                    "probs": dict(zip(names, p)),
                }
                if gold[i] is not None:
                    row["gold"] = gold[i]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)
