"""Running one dataset of the table: extraction, importance, and every (method, seed) head run."""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import time
from pathlib import Path

import yaml

from layerfusion.errors import ConfigError
from layerfusion.files import write_json
from layerfusion.reproduce.grid import (
    FACTORIAL,
    L2_GRID,
    SPLITS,
    Row,
    _fmt_layers,
    _is,
    _layers,
    _row_id,
    _spec_key,
)
from layerfusion.reproduce.stats import macro_f1
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
        *analysis.cka_table({k: _open(e[1]) for k, e in entries.items()}),
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
            probes = [_probe_run(per_run, name, n, k) for k in encs]
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
    try:
        return run_one(*task)
    finally:
        torch.set_num_threads(threads)


def _probe_run(per_run: list[dict], name: str, n: int | None, key: str) -> dict:
    """The first-seed `linear_probe` run of encoder `key` (stacking combines their log-probabilities)."""
    for r in per_run:
        if (r["dataset"], r["train_rows"], r["method"], r["encoders"]) == (
            name,
            n or "",
            "linear_probe",
            key,
        ):
            return r
    raise ConfigError("the stacking row needs the linear_probe row: add linear_probe to --methods")


def stack_one(probes: list[dict], seed: int, run_dir: Path) -> dict:
    """The stacking bound from the encoders' linear_probe log-probabilities (see `stacking.stack`)."""
    import numpy as np

    from layerfusion.analysis import read_predictions, write_predictions
    from layerfusion.reproduce.stacking import stack

    start = time.perf_counter()
    logp = {
        s: [np.load(Path(p["run_dir"]) / f"logprobs_{s}.npy") for p in probes]
        for s in ("val", "test")
    }
    gold = {
        s: read_predictions(Path(probes[0]["run_dir"]) / f"predictions_{s}.csv")
        for s in ("val", "test")
    }
    pred = stack(logp["val"], gold["val"]["gold"], logp["test"], seed=seed)
    for s in ("val", "test"):
        write_predictions(
            run_dir / f"predictions_{s}.csv", gold[s]["index"], pred[s], gold[s]["gold"]
        )
    acc = {s: float((pred[s] == gold[s]["gold"]).mean()) for s in ("val", "test")}
    result = {
        "method": "stacking",
        "encoders": "+".join(p["encoders"] for p in probes),
        "layers": " ".join(p["layers"] for p in probes),
        "seed": seed,
        "test_acc": acc["test"],
        "test_f1": macro_f1(pred["test"], gold["test"]["gold"]),
        "val_acc": acc["val"],
        "epochs": 0,
        "train_s": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
    write_json(run_dir / "result.json", result)
    return {**result, "reused": False}


def extract_features(cfg: dict, run_dir: Path) -> dict[str, dict]:
    """Extract (or find cached) every split of each encoder alone; its extraction peak memory.

    Figures are kept in `<run_dir>/extraction.json` from the invocation that really extracted; a warm
    cache keeps the earlier figures (NaN when there are none)."""
    import torch

    from layerfusion.memory import peak_memory_mb, reset_peak_memory

    path = run_dir / "extraction.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    figures = {}
    for spec in cfg["model"]["encoders"]:
        key = _spec_key(spec)
        c = _bare(cfg, run_dir)
        c["model"].update(encoders=[spec], head="gated", layers=None)
        trainer, model, dm = instantiate(c)
        dm.setup("fit")
        dm.setup("test")
        gc.collect()
        reset_peak_memory()
        built = 0.0
        with torch.no_grad():
            for split in SPLITS:
                model.extract_split(dm.texts(split), split, trainer.strategy.root_device)
                built += model.cache.last_build_seconds or 0.0
        if built > 0:
            figures[key] = {"peak_mb": peak_memory_mb(), "build_s": built}
        else:
            figures[key] = known.get(key, {"peak_mb": math.nan, "build_s": math.nan})
        del trainer, model, dm
        gc.collect()
    write_json(path, figures)
    return figures


def importance(
    cfg: dict, name: str, share: float, out: Path, run_dir: Path
) -> tuple[dict[str, dict[str, list[int]]], dict[str, int], dict[str, list[Path]]]:
    """Score the layers on train/dev (no head training): the selections, each encoder's depth, and
    each encoder's feature-cache entries of train/dev/test."""
    from layerfusion.callbacks import LayerImportance, LayerSelection
    from layerfusion.importance import ranked, scores_by_encoder, select_cumulative

    c = _bare(cfg, run_dir)
    callbacks = [
        cb
        for cb in cfg["trainer"].get("callbacks", [])
        if _is(cb, "LayerImportance", "LayerSelection")
    ]
    if not any(_is(cb, "LayerImportance") for cb in callbacks):
        raise ConfigError(f"{name}: the experiment config needs a LayerImportance callback")
    callbacks = copy.deepcopy(callbacks)
    for cb in callbacks:
        if _is(cb, "LayerImportance"):
            cb.setdefault("init_args", {}).update(
                dirpath=str(out / "paper_importance"), filename=name
            )
    c["trainer"]["callbacks"] = callbacks
    c["model"]["head"] = "gated"
    c["model"]["layers"] = None
    trainer, model, dm = instantiate(c)
    trainer.fit(model, datamodule=dm)
    imp = next(cb for cb in trainer.callbacks if isinstance(cb, LayerImportance))
    sel = next((cb for cb in trainer.callbacks if isinstance(cb, LayerSelection)), None)
    scores = scores_by_encoder(imp.table)
    probe = {k: {r.layer: r.probe_acc for r in imp.table if r.encoder == k} for k in scores}
    selections = {
        "top_k": sel.selection if sel is not None else model.selection,
        "cumulative": select_cumulative(scores, share),
        "best": {k: [ranked(p)[0]] for k, p in probe.items()},
    }
    depth = {k: e.num_layers for k, e in model.encoders.items()}
    dm.setup("test")
    entries = {
        # the all-layer entries `extract_features` built, keyed with this device's compute dtype
        k: [
            model.cache.entry_dir(model.cache.key(e, dm.texts(s), s, trainer.strategy.root_device))
            for s in SPLITS
        ]
        for k, e in model.encoders.items()
    }
    log.info("%s selections: %s", name, selections)
    del trainer, model, dm
    gc.collect()
    return selections, depth, entries


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
    c["trainer"]["logger"] = _logger(logger, row_dir, seed)
    fit = _fit_linear_probe if row.head == "linear" else _fit_head
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


def _fit_linear_probe(c: dict, run_dir: Path) -> dict:
    """The `linear` head fitted to convergence for each L2 of `L2_GRID`; the best on dev is tested.

    The fit is convex and full-batch, so the seed changes nothing: later seeds of the same model and
    data reuse the first seed's fit (same predictions, same figures)."""
    import torch

    from layerfusion.analysis import write_predictions

    key = json.dumps([c["model"], c["data"]], sort_keys=True, default=str)
    if key not in _PROBES:
        _PROBES.clear()  # one row at a time: keep only the latest
        _PROBES[key] = _probe(c)
    out, preds, state = _PROBES[key]

    import numpy as np

    for s, (index, pred, gold, logp) in preds.items():
        write_predictions(run_dir / f"predictions_{s}.csv", index, pred, gold)
        np.save(run_dir / f"logprobs_{s}.npy", logp)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(state, run_dir / "checkpoints" / "linear_probe.pt")
    return dict(out)


_PROBES: dict[str, tuple] = {}


def _probe(c: dict) -> tuple[dict, dict, dict]:
    """(figures, predictions per split, head state) of the dev-tuned linear probe of config `c`."""
    import torch
    from torchmetrics.functional.classification import multiclass_f1_score

    from layerfusion.memory import peak_memory_mb, reset_peak_memory

    gc.collect()
    reset_peak_memory()
    c = copy.deepcopy(c)
    c["trainer"]["logger"] = False  # no Lightning loop runs: nothing to log per step
    trainer, model, dm = instantiate(c)
    dm.setup("fit")
    dm.setup("test")
    device = trainer.strategy.root_device
    head = model.head.to(device)
    feats = {s: model.extract_split(dm.texts(s), s, device) for s in SPLITS}
    gold = {s: torch.tensor(dm.label_ids(s), device=device) for s in SPLITS}

    def logits(split: str) -> torch.Tensor:
        with torch.no_grad():
            return head({k: v.to(device) for k, v in feats[split].items()})

    def predict(split: str) -> torch.Tensor:
        return logits(split).argmax(-1)

    start = time.perf_counter()
    best, iters = None, {}
    for l2 in L2_GRID:
        iters[l2] = head.fit(
            {k: v.to(device) for k, v in feats["train"].items()}, gold["train"], l2
        )
        acc = float((predict("val") == gold["val"]).float().mean())
        if best is None or acc > best[1]:
            best = (l2, acc, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    train_s = time.perf_counter() - start
    logp = {s: torch.log_softmax(logits(s).float(), -1).cpu() for s in ("val", "test")}
    pred = {s: logp[s].argmax(-1) for s in ("val", "test")}
    preds = {
        s: (range(len(pred[s])), pred[s], gold[s].cpu(), logp[s].numpy()) for s in ("val", "test")
    }
    out = {
        "test_acc": float((pred["test"] == gold["test"].cpu()).float().mean()),
        "test_f1": float(
            multiclass_f1_score(
                pred["test"], gold["test"].cpu(), len(model.label_names), average="macro"
            )
        ),
        "val_acc": best[1],
        "l2": best[0],
        "lbfgs_iterations": iters[best[0]],
        "epochs": 0,
        "train_s": train_s,
        "train_peak_mb": peak_memory_mb(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    state = {k: v.cpu().clone() for k, v in head.state_dict().items()}
    del trainer, model, dm
    return out, preds, state


def extraction_seconds(entries: list[Path]) -> float:
    """Cold extraction time recorded in the manifests of these cache entries (NaN when one lacks it)."""
    from layerfusion.features.cache import read_manifest

    return sum(read_manifest(e).get("build_seconds", math.nan) for e in entries)


def instantiate(cfg: dict):
    """Trainer, model and datamodule from a config dict, exactly as `layerfusion fit --config` builds them."""
    from layerfusion.cli import build_cli

    cli = build_cli(cfg)
    return cli.trainer, cli.model, cli.datamodule


def _gate(gates, encoders: list[str]) -> str:
    """Mean gate weight of each encoder over the test rows (`"enc:w enc:w"`; empty without a gate)."""
    if not gates.shape[1]:
        return ""
    return " ".join(f"{k}:{float(w):.4f}" for k, w in zip(encoders, gates.mean(0)))


def _open(entry: Path):
    from layerfusion.features.cache import open_entry

    return open_entry(entry)


def _bare(cfg: dict, run_dir: Path) -> dict:
    """`cfg` as a quiet, logger-free, callback-free trainer for extraction and scoring."""
    c = copy.deepcopy(cfg)
    c["trainer"].update(
        callbacks=[],
        limit_train_batches=0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    return c


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
