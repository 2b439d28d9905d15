"""Lightning helpers shared by the callbacks: the run directory, gathering rows across ranks, logger
output (W&B-aware, rank 0 only). Files are written with `layerfusion.files`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory: `trainer.default_root_dir` (stable across fit / test / predict of one run)."""
    path = Path(trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def gather_rows(pl_module: L.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows [n_rank, ...]` concatenated in rank order, on every rank (counts may differ).

    Unpadded evaluation gives ranks one row more or less; `all_gather` needs equal shapes, so each rank
    pads to the largest count and the padding is cut off again. Call on every rank.
    """
    if pl_module.trainer.world_size == 1:
        return rows
    device = pl_module.trainer.strategy.root_device  # FSDP does not update `pl_module.device`
    count = torch.tensor([len(rows)], device=device)
    counts = pl_module.all_gather(count).flatten().tolist()
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: len(rows)] = rows
    gathered = pl_module.all_gather(padded.to(device)).cpu()
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


def log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Scalars to every logger (call on rank 0)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def log_image(trainer: L.Trainer, key: str, path: Path) -> None:
    """A PNG to W&B (other loggers: the file in the run directory is the record)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)])


def log_table(trainer: L.Trainer, key: str, rows: list[dict]) -> None:
    """Rows of dicts as a W&B Table (other loggers: the CSV in the run directory is the record)."""
    if not rows:
        return
    columns = list(rows[0])
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(
                key=key, columns=columns, data=[[r.get(c) for c in columns] for r in rows]
            )
