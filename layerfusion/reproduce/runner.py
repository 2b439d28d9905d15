"""Running one dataset of the table: every (method, seed) head run, in this process or in `--jobs` workers."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import re
import shutil
import time
from pathlib import Path

import yaml

from layerfusion.errors import ConfigError
from layerfusion.files import write_json
from layerfusion.reproduce.grid import (
    FACTORIAL,
    Row,
    _fmt_layers,
    _is,
    _layers,
    _row_id,
    _spec_key,
)
from layerfusion.reproduce.prepare import (
    extract_features,
    extraction_seconds,
    importance,
    instantiate,
)
from layerfusion.reproduce.probe import fit_linear_probe, probe_run, stack_one
from layerfusion.reproduce.tables import aggregate, complementarity

log = logging.getLogger("layerfusion.reproduce")


def reproduce_dataset(
    path: Path,
    rows: list[Row],
    seeds: list[int],
    share: float,
    out: Path,
    runs: Path,
    logger: str = "csv",
    train_rows: list[int] | None = None,
    jobs: int = 1,
    arm_methods: list[str] | tuple[str, ...] = FACTORIAL,
    reuse_only: bool = False,
) -> tuple[list[dict], list[dict], list[dict]]:
    """All rows of one experiment config: (aggregated rows, per-seed results, encoder-pair analysis).

    `train_rows`: the low-data arm: the `arm_methods` rows of `rows` again on that many training rows each
    (stratified, `data.seed`; dev and test unchanged; layers as selected on the full data). `jobs`: head
    runs at once, each in its own worker process (`run_many`). `reuse_only`: tabulate the finished runs
    only (a row needs every seed)."""
    from layerfusion import analysis
    from layerfusion.features.cache import open_entry

    if not path.is_file():
        raise ConfigError(f"experiment config {path} does not exist")
    cfg = yaml.safe_load(path.read_text())
    dataset = cfg.get("data", {}).get("dataset")
    if not dataset:
        raise ConfigError(f"{path}: data.dataset is not set")
    name = Path(str(dataset)).name
    extraction = extract_features(cfg, runs / name)
    selections, depth, entries = importance(cfg, name, share, out, runs / name)
    cka_rows = analysis.write_cka(
        *analysis.cka_table({k: open_entry(e[1]) for k, e in entries.items()}),
        out / "paper_cka" / f"{name}.csv",
        out / "paper_cka" / f"{name}.png",
        f"{name}: linear CKA between layers (dev features)",
    )
    keys = list(depth)
    arms = [(None, rows)] + [
        (n, [r for r in rows if r.method in arm_methods]) for n in (train_rows or [])
    ]
    cells = []  # (n, row, encs, row_dir) in table order
    tasks = []
    for n, arm_rows in arms:
        arm_cfg = copy.deepcopy(cfg)
        if n is not None:
            arm_cfg["data"]["max_train_samples"] = n
            # an epoch of n rows can be one step: Lightning warns when it is shorter than the logging
            # interval (50 steps by default), so the arm logs every step
            arm_cfg["trainer"]["log_every_n_steps"] = 1
        arm_dir = runs / name / ("" if n is None else f"n{n}")
        for row in arm_rows:
            for encs in [[k] for k in keys] if row.encoders == "*" else [keys]:
                row_dir = arm_dir / _row_id(row, encs)
                cells.append((n, row, encs, row_dir))
                if row.head == "stacking":
                    continue
                layers = _layers(row, encs, selections, depth)
                features = {
                    k: {"val": str(entries[k][1]), "test": str(entries[k][2])} for k in encs
                }
                tasks += [
                    (arm_cfg, row, encs, layers, seed, row_dir, logger, features, reuse_only)
                    for seed in seeds
                ]
    done = iter(run_many(tasks, jobs))
    table, per_run = [], []
    for n, row, encs, row_dir in cells:
        if row.head == "stacking":
            probes = [probe_run(per_run, name, n, k) for k in encs]
            results = [stack_one(probes, seeds[0], row_dir / f"seed{seeds[0]}")]
        else:
            results = [next(done) for _ in seeds]
            if None in results:  # --reuse-only: a row is tabulated with every seed or not at all
                log.info(
                    "%s %s %s: %d of %d seeds finished, left out",
                    name,
                    row.method,
                    "+".join(encs),
                    len(seeds) - results.count(None),
                    len(seeds),
                )
                continue
        results = [{"dataset": name, "train_rows": n or "", **r} for r in results]
        per_run += results
        table.append(
            aggregate(
                name,
                row.method,
                row.group,
                results,
                extract_s=sum(extraction_seconds(entries[k]) for k in encs),
                extract_peak_mb=max(extraction[k]["peak_mb"] for k in encs),
            )
        )
        log.info(
            "%s%s %s %s: test_acc %.4f (%d seeds)",
            name,
            "" if n is None else f" n={n}",
            row.method,
            "+".join(encs),
            table[-1]["test_acc_mean"],
            len(results),
        )
    pairs = complementarity([r for r in table if not r["train_rows"]], per_run)
    if logger == "wandb":
        analysis.log_wandb(
            f"{name}-analysis",
            name,
            {
                "runs": [{k: v for k, v in r.items() if k != "features"} for r in per_run],
                "complementarity": pairs,
                "cka": cka_rows,
            },
            {"cka_heatmap": out / "paper_cka" / f"{name}.png"},
            runs / name / "analysis",
        )
    return table, per_run, pairs


HEAD_THREADS = 1
"""Torch threads of a head run: its ops are tiny, and on a busy machine a second thread mostly waits at
each op's barrier (an SST-2 `best_layer` run: 265 s of training with 2 threads, 50 s with 1, load 6 on
2 cores)."""


def run_many(tasks: list[tuple], jobs: int = 1) -> list[dict]:
    """`run_one(*task)` for every task, in order: in this process (`jobs` 1) or in `jobs` worker processes
    (spawned; each run is the same `LightningCLI` fit either way). Head runs use `HEAD_THREADS` threads."""
    if jobs <= 1 or len(tasks) <= 1:
        return [_run_task(t) for t in tasks]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init
    ) as pool:
        return list(pool.map(_run_task, tasks))


def _worker_init() -> None:
    from layerfusion.cli import log_to_stderr

    log_to_stderr()


def _run_task(task: tuple) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(HEAD_THREADS)
    start = time.perf_counter()
    try:
        with _quiet_head_run():
            result = run_one(*task)
    finally:
        torch.set_num_threads(threads)
    if result is not None and not result["reused"]:
        log.info(
            "%s: test_acc %.4f, val_acc %.4f, %d epochs, %.0f s",
            result["run_dir"],
            result["test_acc"],
            result["val_acc"],
            result["epochs"],
            time.perf_counter() - start,
        )
    return result


class _RunNoise(logging.Filter):
    """Drops the INFO lines that every head run repeats: Lightning's device summary, seed and checkpoint
    restores, layerfusion's cache hits and compute precision (about 20 lines a run, 10,000 for the full
    grid, saying nothing the run directory does not). Only these messages; warnings, extraction progress
    and errors still show, and `_run_task` logs one line per finished run instead."""

    NOISE = re.compile(
        r"(GPU|TPU|HPU) available|Restoring states from the checkpoint path|Loaded model weights from "
        r"the checkpoint|`Trainer\.fit` stopped|Seed set to|feature cache hit|encoder \S+ computes in"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not self.NOISE.search(record.getMessage())


NOISY_LOGGERS = (
    "lightning.fabric.utilities.seed",
    "layerfusion.features.cache",
    "layerfusion.encoders.frozen",
)
"""The loggers `_RunNoise` filters during a head run besides Lightning's `rank_zero_info` logger (each logs
the messages itself, so a filter there catches them before any handler)."""


@contextlib.contextmanager
def _quiet_head_run():
    # rank_zero.log: the logger rank_zero_info writes to (as in cli.quiet_console)
    from lightning_utilities.core import rank_zero

    noise = _RunNoise()
    loggers = [rank_zero.log, *(logging.getLogger(name) for name in NOISY_LOGGERS)]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)


def run_one(
    cfg: dict,
    row: Row,
    encs: list[str],
    layers: dict,
    seed: int,
    row_dir: Path,
    logger: str = "csv",
    features: dict | None = None,
    reuse_only: bool = False,
) -> dict | None:
    """Train, validate and test one head; reuse its `result.json` when the resolved config is unchanged.

    `features`: the feature-cache entries of the run's encoders (recorded for `layerfusion analyze`).
    `reuse_only`: train nothing; None when the run has not finished before."""
    run_dir = row_dir / f"seed{seed}"
    c = copy.deepcopy(cfg)
    by_key = {_spec_key(s): s for s in c["model"]["encoders"]}
    c["seed_everything"] = seed
    c["model"].update(encoders=[by_key[k] for k in encs], head=row.head, layers=layers)
    keep = [
        cb
        for cb in c["trainer"].get("callbacks", [])
        if _is(cb, "EarlyStopping")  # the row's layers are fixed: no importance, no selection
    ]
    keep.append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(run_dir / "checkpoints"),
                "filename": "best",
                "monitor": "val_acc",
                "mode": "max",
                "enable_version_counter": False,
            },
        }
    )
    c["trainer"].update(
        callbacks=keep,
        default_root_dir=str(run_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    from layerfusion.cli import resolved_config_hash

    settings = resolved_config_hash(c)
    result_path = run_dir / "result.json"
    needed = [f"predictions_{s}.csv" for s in ("val", "test")]
    if row.head == "linear":
        needed += [f"logprobs_{s}.npy" for s in ("val", "test")]  # for the stacking row
    if result_path.is_file() and all((run_dir / f).is_file() for f in needed):
        try:
            done = json.loads(result_path.read_text())
        except ValueError:
            done = {}
        if done.get("settings") == settings:
            if features is not None and done.get("features") != features:
                done["features"] = features  # the cache moved: the run itself is still valid
                write_json(result_path, done)
            return {**done, "reused": True}
    if reuse_only:
        return None
    # a redone run (settings changed, damaged, unfinished) starts from an empty directory: its old
    # checkpoint and logs would mix with the new run's (and Lightning warns about both)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    c["trainer"]["logger"] = _logger(logger, row_dir, seed)
    fit = fit_linear_probe if row.head == "linear" else _fit_head
    result = {
        "method": row.method,
        "encoders": "+".join(encs),
        "layers": _fmt_layers(layers),
        "seed": seed,
        **fit(c, run_dir),
        "run_dir": str(run_dir),
        "features": features or {},
        "settings": settings,
    }
    write_json(result_path, result)
    return {**result, "reused": False}


def _fit_head(c: dict, run_dir: Path) -> dict:
    """`fit`, then `validate` and `test` on the best checkpoint; predictions of both into `run_dir`."""
    import torch
    from lightning.pytorch.loggers import WandbLogger

    from layerfusion.callbacks import EvalPredictions
    from layerfusion.memory import peak_memory_mb, reset_peak_memory

    gc.collect()
    reset_peak_memory()
    trainer, model, dm = instantiate(c)
    if trainer.world_size > 1:
        raise ConfigError("reproduce trains each row in one process: set trainer.devices to 1")
    preds = EvalPredictions()  # writes predictions_{val,test}.csv into the run directory
    trainer.callbacks.append(preds)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - start - sum(model.extract_seconds.values())
    ckpt = trainer.checkpoint_callback
    trainer.validate(model, datamodule=dm, ckpt_path="best", verbose=False)
    metrics = trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)[0]
    for lg in trainer.loggers:  # close each W&B run: the next WandbLogger would reuse an open one
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()
    out = {
        "gate": _gate(preds.gates["test"], list(model.encoders)),
        "test_acc": metrics["test_acc"],
        "test_f1": metrics["test_f1"],
        "val_acc": float(ckpt.best_model_score),
        "epochs": trainer.current_epoch,
        "train_s": train_s,
        "train_peak_mb": peak_memory_mb(),
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
    }
    del trainer, model, dm
    return out


def _gate(gates, encoders: list[str]) -> str:
    """Mean gate weight of each encoder over the test rows (`"enc:w enc:w"`; empty without a gate)."""
    if not gates.shape[1]:
        return ""
    return " ".join(f"{k}:{float(w):.4f}" for k, w in zip(encoders, gates.mean(0)))


def _logger(kind: str, row_dir: Path, seed: int) -> dict:
    """The run's logger: CSV in `<row_dir>/seed<k>/`, or a W&B run grouped by dataset."""
    if kind == "wandb":
        import os

        return {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {
                "project": "layerfusion-reproduce",
                "group": row_dir.parent.name,
                "name": f"{row_dir.name}-seed{seed}",
                "save_dir": str(row_dir / f"seed{seed}"),
                "offline": os.environ.get("WANDB_MODE") != "online",
                "log_model": False,
            },
        }
    return {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(row_dir), "name": "", "version": f"seed{seed}"},
    }
