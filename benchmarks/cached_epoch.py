"""One head-training epoch with the encoders in the loop vs with cached features (real Trainer)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import lightning as L
from benchutil import Sizes, alternate, data_dir, log, median, round_ratios, sync

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.module import LayerFusionModule


def bench_cached_epoch(sizes: Sizes, device: str, workdir: Path) -> dict:
    """`cached_epoch_speedup` = online epoch time / cached epoch time (cache warm before timing);
    `cached_fit_speedup` = the same for the whole `Trainer.fit` call (setup, cache reads, the epoch)."""
    specs = [EncoderSpec(m, max_length=sizes.max_length) for m in sizes.models]
    setups = {}
    for mode in ("online", "cached"):
        dm = TextClassificationDataModule(
            dataset="sst2",
            data_dir=str(data_dir()),
            encoders=specs,
            features=mode,
            batch_size=sizes.epoch_batch_size,
            max_train_samples=sizes.epoch_texts,
            max_eval_samples=sizes.batch_size,  # no validation runs, but `fit` prepares the split
        )
        module = LayerFusionModule(
            encoders=specs,
            label_names=dm.label_names,
            features=mode,
            cache_dir=str(workdir / "feature-cache"),
            cache_dtype="float16",
            extract_batch_size=sizes.batch_size,
        )
        setups[mode] = (module, dm)
        seconds = fit_one_epoch(module, dm, device, limit_train_batches=2)["fit"]
        log(
            f"cached epoch: warm-up {mode} ({'cache built, ' if mode == 'cached' else ''}{seconds:.1f}s)"
        )
    fits: dict[str, list[dict]] = {"online": [], "cached": []}
    # encoder forward passes during the timed epochs: none may run on a warm cache
    forwards = {"online": 0, "cached": 0}
    for mode, (module, _) in setups.items():
        for encoder in module.encoders.values():
            encoder.register_forward_pre_hook(partial(_count, forwards, mode))

    def epoch(mode: str) -> float:
        timing = fit_one_epoch(*setups[mode], device)
        fits[mode].append(timing)
        log(f"cached epoch: {mode} epoch {timing['epoch']:.2f}s (fit {timing['fit']:.2f}s)")
        return timing["epoch"]

    times = alternate({m: partial(epoch, m) for m in ("cached", "online")}, sizes.epoch_rounds)
    ratios = round_ratios(times["online"], times["cached"])
    fit_seconds = {m: [f["fit"] for f in fs] for m, fs in fits.items()}
    fit_ratios = round_ratios(fit_seconds["online"], fit_seconds["cached"])
    return {
        "cached_epoch_speedup": median(ratios),
        "cached_fit_speedup": median(fit_ratios),
        "raw": {
            "encoder_forwards": forwards,
            "fit_round_ratios": fit_ratios,
            "models": [s.key for s in specs],
            "train_texts": sizes.epoch_texts,
            "batch_size": sizes.epoch_batch_size,
            "epoch_seconds": times,
            "fit_seconds": fit_seconds,
            "round_ratios": ratios,
        },
    }


def fit_one_epoch(
    module: LayerFusionModule,
    dm: TextClassificationDataModule,
    device: str,
    limit_train_batches: int | None = None,
) -> dict[str, float]:
    """Run `Trainer.fit` for one epoch; seconds of the whole fit and of the training epoch alone."""
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        limit_train_batches=limit_train_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        precision="32-true",
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return {"fit": time.perf_counter() - start, "epoch": timer.seconds}


def _count(counts: dict[str, int], mode: str, *_) -> None:
    counts[mode] += 1


class EpochTimer(L.Callback):
    """Wall time from the start to the end of the (single) training epoch."""

    def __init__(self) -> None:
        self.seconds = float("nan")
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(str(pl_module.device))
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(str(pl_module.device))
        self.seconds = time.perf_counter() - self._start
