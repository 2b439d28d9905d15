"""Checkpoint I/O that never leaves a half-written checkpoint and never unpickles code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from layerfusion.files import atomic_write


class SafeCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with atomic saves (temporary file, fsync, rename: a killed run leaves the
    previous checkpoint intact) and `weights_only=True` loads (plain tensors and containers only) of layerfusion checkpoints only.

    Use in a config: `trainer.plugins: [{class_path: layerfusion.checkpoint_io.SafeCheckpointIO}]`.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options, got {storage_options!r}"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), fsync=True)

    def load_checkpoint(
        self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at `path`, on the CPU; a missing file, another file type or another program's
        checkpoint raises `CheckpointError` naming the file and what is wrong."""
        from layerfusion.checkpoint import read_checkpoint

        return read_checkpoint(path)
