"""Test helper callback for the DDP tests: which rows each rank trained and evaluated on, its head at the end."""

from __future__ import annotations

import atexit
import hashlib
import json
from pathlib import Path

import lightning as L


class RecordRanks(L.Callback):
    """Write `<stage>-rank{r}.json`: the train row indices of every epoch this process ran, the global
    step it started and ended at, the row indices each rank validated / tested / predicted (last epoch),
    a SHA-256 of the head and the synced val_acc; and at the process's exit `exit-rank{r}.json`: whether
    its process group was still alive after every at-exit handler registered later had run."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.rows: dict[int, list[int]] = {}
        self.eval_rows: dict[str, list[int]] = {}
        self.rank = None
        atexit.register(self._at_exit)  # before the module's setup: runs after what that registers

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.rank = trainer.global_rank

    def _at_exit(self) -> None:
        import torch.distributed as dist

        if self.rank is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            alive = dist.is_initialized()
            (self.out / f"exit-rank{self.rank}.json").write_text(json.dumps({"group_alive": alive}))

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = trainer.global_step  # after any checkpoint restore

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.eval_rows["val"] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.eval_rows["val"].extend(batch["index"].tolist())

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.eval_rows.setdefault("test", []).extend(batch["index"].tolist())

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.eval_rows.setdefault("predict", []).extend(batch["index"].tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        h = hashlib.sha256()
        for k, v in sorted(pl_module.head.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        record = {
            "rows": self.rows,
            "head": h.hexdigest(),
            "val_acc": float(trainer.callback_metrics["val_acc"]),
            "steps": [self.first_step, trainer.global_step],
        }
        self._write(trainer, "fit", record)

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, "test", {})

    def on_predict_end(self, trainer, pl_module) -> None:
        self._write(trainer, "predict", {})

    def _write(self, trainer, stage: str, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {**record, "world": trainer.world_size, "eval_rows": self.eval_rows}
        (self.out / f"{stage}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def process_groups_left_alive(probe: Path) -> list[int]:
    """The ranks whose process group was still alive at their exit (read and removed)."""
    alive = []
    for r in range(2):
        path = probe / f"exit-rank{r}.json"
        if json.loads(path.read_text())["group_alive"]:
            alive.append(r)
        path.unlink()
    return alive


COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all_single",
    "barrier",
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
)


class RecordCollectives(L.Callback):
    """Record every `torch.distributed` collective this rank calls from `setup` to `teardown` (the
    cache build of `fit` included): op name, and device, dtype and shape of each tensor argument.
    Writes `<out>/collectives-<stage>-rank{r}.json` with the strategy's root device."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.calls: list[dict] = []
        self._saved: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        import torch.distributed as dist

        self.calls = []
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._saved[name] = original
            setattr(dist, name, self._recording(name, original))

    def _recording(self, name: str, original):
        import torch

        def call(*args, **kwargs):
            tensors = []
            for a in [*args, *kwargs.values()]:
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(t, torch.Tensor):
                        tensors.append([t.device.type, str(t.dtype), list(t.shape)])
            self.calls.append({"op": name, "tensors": tensors})
            return original(*args, **kwargs)

        return call

    def teardown(self, trainer, pl_module, stage: str) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"root_device": trainer.strategy.root_device.type, "calls": self.calls}
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn here
        path = self.out / f"collectives-{stage}-rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


class FailOnRank(L.Callback):
    """Raise on one rank only, at `point`: `importance` (the start of fit, where LayerImportance listed
    after this callback scores), `train` (a training step), `predict` (a predict step) or `merge`
    (PredictionWriter's merge of the ranks' parts, as a full disk would)."""

    def __init__(self, point: str, rank: int = 1) -> None:
        self.point, self.rank = point, rank

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.global_rank != self.rank or self.point != "merge":
            return
        import errno

        from layerfusion.callbacks import PredictionWriter

        def full(writer, world):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

        PredictionWriter._merge = full

    def _maybe(self, trainer, point: str) -> None:
        if trainer.global_rank == self.rank and self.point == point:
            raise RuntimeError(f"injected failure on rank {self.rank} at {point}")

    def on_fit_start(
        self, trainer, pl_module
    ) -> None:  # listed before LayerImportance: its scoring
        self._maybe(trainer, "importance")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe(trainer, "train")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._maybe(trainer, "predict")


def collectives_nccl_accepts(probe: Path, stage: str) -> int:
    """Check the collectives both ranks called in `stage`: the same ops in the same order, every tensor
    on the strategy's root device and of the same shape and dtype on both ranks (NCCL's rules; Gloo
    tolerates more). The number of collectives checked."""
    ranks = [
        json.loads((probe / f"collectives-{stage}-rank{r}.json").read_text()) for r in range(2)
    ]
    calls0, calls1 = ranks[0]["calls"], ranks[1]["calls"]
    assert [c["op"] for c in calls0] == [c["op"] for c in calls1], stage
    for a, b in zip(calls0, calls1, strict=True):
        assert a["tensors"] == b["tensors"], (stage, a, b)  # device, dtype, shape per tensor
        for device, _, _ in a["tensors"]:
            assert device == ranks[0]["root_device"], (stage, a)
    return len(calls0)
