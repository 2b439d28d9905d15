"""Wall time, peak memory and throughput per stage: the paper's resource overhead as numbers."""

from __future__ import annotations

import time

import lightning as L
import torch
from layerfusion.callbacks.tracking import log_metrics, run_dir
from typing_extensions import override

from layerfusion.files import write_json
from layerfusion.memory import peak_memory_mb


class ResourceMonitor(L.Callback):
    """Measure feature extraction, head training and inference; write `<default_root_dir>/resources.json`
    (one entry per stage, merged across fit / test / predict) and log `resources/*` to the loggers.

    Figures: `extract_s` (feature extraction, summed over encoders and splits; 0 for cache hits),
    `train_s` and `train_examples_per_s` (head training, all epochs), `<stage>_s` and
    `<stage>_examples_per_s` for test / predict (without the extraction the module runs at the start of
    the stage), and `peak_mem_mb`: peak CUDA memory allocated when on a GPU, otherwise the process's
    peak resident set size (RSS). Measured on rank 0.
    """

    def __init__(self) -> None:
        self._start: dict[str, float] = {}
        self._extract_before: dict[str, float] = {}
        self._examples: dict[str, int] = {}
        self.figures: dict[str, dict[str, float]] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._begin("train", pl_module)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._examples["train"] += len(batch["labels"])

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self._end("train", trainer, pl_module, stage="fit")

    @override
    def on_test_start(self, trainer, pl_module) -> None:
        self._begin("test", pl_module)

    @override
    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._examples["test"] += len(batch["labels"])

    @override
    def on_test_end(self, trainer, pl_module) -> None:
        self._end("test", trainer, pl_module, stage="test")

    @override
    def on_predict_start(self, trainer, pl_module) -> None:
        self._begin("predict", pl_module)

    @override
    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._examples["predict"] += len(batch["labels"])

    @override
    def on_predict_end(self, trainer, pl_module) -> None:
        self._end("predict", trainer, pl_module, stage="predict")

    def _begin(self, name: str, pl_module) -> None:
        self._start[name] = time.perf_counter()
        self._extract_before[name] = _extract_seconds(pl_module)
        self._examples[name] = 0

    def _end(self, name: str, trainer: L.Trainer, pl_module, stage: str) -> None:
        # the module extracts a stage's features in its own `on_<stage>_start`, after this callback's
        seconds = time.perf_counter() - self._start[name]
        seconds -= _extract_seconds(pl_module) - self._extract_before[name]
        # ranks may hold one row more or less (unpadded evaluation): add up what each one saw
        mine = torch.tensor(self._examples[name], device=trainer.strategy.root_device)
        examples = int(trainer.strategy.reduce(mine, reduce_op="sum"))
        self._examples[name] = examples
        figures = {
            "extract_s": _extract_seconds(pl_module),
            f"{name}_s": seconds,
            f"{name}_examples": self._examples[name],
            f"{name}_examples_per_s": self._examples[name] / seconds if seconds > 0 else 0.0,
            "peak_mem_mb": peak_memory_mb(),
            "device": "cuda"
            if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
            else "cpu",
            "world_size": trainer.world_size,
        }
        self.figures[stage] = figures
        if not trainer.is_global_zero:
            return
        path = run_dir(trainer) / "resources.json"
        merged = _read(path)
        merged[stage] = figures
        write_json(path, merged)
        log_metrics(
            trainer,
            {f"resources/{k}": float(v) for k, v in figures.items() if isinstance(v, (int, float))},
        )


def _extract_seconds(pl_module) -> float:
    """Seconds the module has spent extracting features so far (all splits)."""
    return float(sum(getattr(pl_module, "extract_seconds", {}).values()))


def _read(path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
