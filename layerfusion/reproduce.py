"""`layerfusion reproduce`: the paper's table (baselines, selection, gated fusion, ablations) from fit configs.

For each experiment config (a normal `layerfusion fit` config, e.g. `configs/experiments/sst2.yaml`):

1. **Extraction**: each encoder alone extracts (or finds cached) its train/dev/test features, with its
   peak memory measured on its own (`<runs>/<dataset>/extraction.json` keeps the figures of the run that
   actually extracted). Every training run below then reads the cache, so runs are measured alike.
2. **Importance** (train/dev only): one `fit` with `limit_train_batches=0` runs the config's
   `LayerImportance` and `LayerSelection` callbacks and writes `<out>/paper_importance/<dataset>.{csv,json}`.
   From the table come the `top_k` selection (the config's `LayerSelection`), a `cumulative` selection
   (`--share`) and each encoder's best layer (highest dev probe accuracy). Linear CKA between every
   (encoder, layer) pair on dev features: `<out>/paper_cka/<dataset>.{csv,png}`.
3. **Rows**: every method of `ROWS` is trained with each seed through the same `LightningCLI` path as
   `layerfusion fit` (config overrides only: seed, encoders, head, layers, callbacks, logger), validated
   and tested on the best-val_acc checkpoint; `linear_probe` fits a linear head to convergence (full-batch
   L-BFGS) for each L2 strength of `L2_GRID` and keeps the best on dev. Each run writes `result.json` and
   `predictions_{val,test}.csv` under `--runs`; a rerun reuses runs whose resolved config is unchanged.
4. **Tables**: `<out>/paper_table.csv` (one row per dataset x method), `<out>/paper_runs.csv` (every
   seed), `<out>/paper_complementarity.csv` (encoder pairs) and `<out>/paper_table.md`, written only
   after every dataset has finished.

Columns: `test_acc_mean/std` (std over seeds, ddof=1; empty for one seed), `test_f1_mean` (macro-F1),
`val_acc_mean`; `vs`: the best single-encoder row of the dataset, chosen by dev accuracy, and against it
`diff` (mean test-accuracy difference over seeds), `diff_lo/diff_hi` (paired bootstrap 95 % interval over
test rows, seed k paired with seed k) and `mcnemar_p_max` (the largest of the per-seed exact McNemar
p-values); `verdict`: `better` / `worse` when the interval excludes 0, else `n.s.`.
`extract_s`: cold extraction time of the row's encoders over train/dev/test (cache manifests);
`extract_peak_mb`: the largest of the row's encoders' extraction peaks; `train_s`: mean head training
wall time per seed (cache reads included; on a shared machine differences between methods are load, not
method); `train_peak_mb`: peak memory of a training run (encoders loaded, cached features in memory,
training, validation and test of the best checkpoint), the largest over seeds. Peak memory is process RSS
on CPU (reset per run via /proc/self/clear_refs) or CUDA memory allocated on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import hashlib
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import yaml

from layerfusion.errors import ConfigError
from layerfusion.tracking import write_csv, write_json, write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
L2_GRID = (
    1e-1,
    1e-2,
    1e-3,
    1e-4,
    1e-5,
    1e-6,
)  # linear_probe: strongest first (ties keep the stronger)
COLUMNS = [
    "dataset",
    "method",
    "group",
    "encoders",
    "layers",
    "test_acc_mean",
    "test_acc_std",
    "test_f1_mean",
    "val_acc_mean",
    "seeds",
    "vs",
    "diff",
    "diff_lo",
    "diff_hi",
    "mcnemar_p_max",
    "verdict",
    "extract_s",
    "extract_peak_mb",
    "train_s",
    "train_peak_mb",
]
NOT_IN_CSV = ("reused", "features")


@dataclass(frozen=True)
class Row:
    """One method of the table: which encoders (`*` = each encoder alone, `all` = all together), which
    head, and which layers (`last`, `best`, `top_k`, `cumulative`, `all`)."""

    method: str
    encoders: str
    head: str
    layers: str
    group: str = "main"
    description: str = ""


ROWS = [
    Row("last_layer", "*", "last_layer", "last", description="last layer, one encoder"),
    Row("best_layer", "*", "single_layer", "best", description="best dev-probe layer, one encoder"),
    Row(
        "linear_probe",
        "*",
        "linear",
        "best",
        description="logistic regression on the best dev-probe layer, L2 chosen on dev",
    ),
    Row("selected", "*", "gated", "top_k", description="importance-selected layers, one encoder"),
    Row(
        "concat_last",
        "all",
        "concat",
        "last",
        description="last layers of all encoders, concatenated",
    ),
    Row(
        "gated",
        "all",
        "gated",
        "top_k",
        description="the method: gated fusion over selected layers",
    ),
    Row(
        "no_gate",
        "all",
        "mix_concat",
        "top_k",
        "ablation",
        "gate off: per-encoder layer mix, encoders concatenated",
    ),
    Row("gated_all_layers", "all", "gated", "all", "ablation", "selection off: every layer"),
    Row(
        "gated_cumulative",
        "all",
        "gated",
        "cumulative",
        "ablation",
        "other selection strategy: cumulative score share",
    ),
    Row(
        "gated_encoder_dropout",
        "all",
        "gated_encoder_dropout",
        "top_k",
        "ablation",
        "encoder dropout 0.5: one encoder's branch zeroed per example at random, gate renormalised",
    ),
]
GROUP = {r.method: r.group for r in ROWS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="layerfusion reproduce",
        description="Train the paper's table (baselines, selection, gated fusion, ablations) for each "
        "experiment config and write <out>/paper_table.{csv,md}.",
    )
    parser.add_argument("configs", nargs="+", help="experiment configs (layerfusion fit configs)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row (default: 0 1 2)"
    )
    parser.add_argument("--share", type=float, default=0.5, help="cumulative selection share")
    parser.add_argument("--out", default="results", help="where the tables go")
    parser.add_argument("--runs", default="runs/reproduce", help="per-run logs and checkpoints")
    parser.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    parser.add_argument(
        "--logger",
        choices=["csv", "wandb"],
        default="csv",
        help="per-run logger: CSV files, or W&B (project layerfusion-reproduce, group = dataset; "
        "offline unless WANDB_MODE=online)",
    )
    args = parser.parse_args(argv)
    from layerfusion.cli import _log_to_stderr

    _log_to_stderr()
    start = time.perf_counter()
    known = {r.method for r in ROWS}
    unknown = set(args.methods or []) - known
    if unknown:
        raise ConfigError(f"unknown methods {sorted(unknown)}; choose from {sorted(known)}")
    missing = [p for p in args.configs if not Path(p).is_file()]
    if missing:  # before any training: a typo in the last config must not surface an hour later
        raise ConfigError(f"experiment config {', '.join(missing)} does not exist")
    rows = [r for r in ROWS if not args.methods or r.method in args.methods]
    out, runs = Path(args.out), Path(args.runs)
    table, per_run, pairs = [], [], []
    for path in args.configs:
        t, r, p = reproduce_dataset(
            Path(path), rows, args.seeds, args.share, out, runs, args.logger
        )
        table += t
        per_run += r
        pairs += p
    wall = time.perf_counter() - start
    # everything is rendered before anything is written: a failure leaves the old tables intact
    files = {
        out / "paper_table.csv": csv_rows(table, COLUMNS),
        out / "paper_runs.csv": csv_rows(per_run),
        out / "paper_complementarity.csv": csv_rows(pairs),
    }
    text = markdown(table, per_run, pairs, args, wall)
    for path, content in files.items():
        write_csv(path, content)
    write_text(out / "paper_table.md", text)
    log.info("wrote %s, %s (%.0f s)", out / "paper_table.csv", out / "paper_table.md", wall)
    return 0


# -- one dataset ---------------------------------------------------------------------------------


def reproduce_dataset(
    path: Path,
    rows: list[Row],
    seeds: list[int],
    share: float,
    out: Path,
    runs: Path,
    logger: str = "csv",
) -> tuple[list[dict], list[dict], list[dict]]:
    """All rows of one experiment config: (aggregated rows, per-seed results, encoder-pair analysis)."""
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
    table, per_run = [], []
    for row in rows:
        for encs in [[k] for k in keys] if row.encoders == "*" else [keys]:
            layers = _layers(row, encs, selections, depth)
            features = {k: {"val": str(entries[k][1]), "test": str(entries[k][2])} for k in encs}
            results = [
                run_one(
                    cfg, row, encs, layers, seed, runs / name / _row_id(row, encs), logger, features
                )
                for seed in seeds
            ]
            per_run += [{"dataset": name, **r} for r in results]
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
                "%s %s %s: test_acc %.4f (%d seeds)",
                name,
                row.method,
                "+".join(encs),
                table[-1]["test_acc_mean"],
                len(results),
            )
    significance(table, per_run)
    pairs = complementarity(table, per_run)
    if logger == "wandb":
        analysis.log_wandb(
            f"{name}-analysis",
            name,
            {"significance": table, "complementarity": pairs, "cka": cka_rows},
            {"cka_heatmap": out / "paper_cka" / f"{name}.png"},
            runs / name / "analysis",
        )
    return table, per_run, pairs


def extract_features(cfg: dict, run_dir: Path) -> dict[str, dict]:
    """Extract (or find cached) every split of each encoder alone; its extraction peak memory.

    Figures are kept in `<run_dir>/extraction.json` from the invocation that really extracted; a warm
    cache keeps the earlier figures (NaN when there are none)."""
    import torch

    from layerfusion.callbacks.resource_monitor import peak_memory_mb, reset_peak_memory

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
) -> dict:
    """Train, validate and test one head; reuse its `result.json` when the resolved config is unchanged.

    `features`: the feature-cache entries of the run's encoders (recorded for `layerfusion analyze`)."""
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
    settings = settings_hash(c)
    result_path = run_dir / "result.json"
    if result_path.is_file() and all(
        (run_dir / f"predictions_{s}.csv").is_file() for s in ("val", "test")
    ):
        try:
            done = json.loads(result_path.read_text())
        except ValueError:
            done = {}
        if done.get("settings") == settings:
            if features is not None and done.get("features") != features:
                done["features"] = features  # the cache moved: the run itself is still valid
                write_json(result_path, done)
            return {**done, "reused": True}
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

    from layerfusion.analysis import write_predictions
    from layerfusion.callbacks.resource_monitor import peak_memory_mb, reset_peak_memory

    gc.collect()
    reset_peak_memory()
    trainer, model, dm = instantiate(c)
    if trainer.world_size > 1:
        raise ConfigError("reproduce trains each row in one process: set trainer.devices to 1")
    preds = _Predictions()
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
    for split in ("val", "test"):
        write_predictions(run_dir / f"predictions_{split}.csv", *preds.arrays(split))
    out = {
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

    for s, (index, pred, gold) in preds.items():
        write_predictions(run_dir / f"predictions_{s}.csv", index, pred, gold)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(state, run_dir / "checkpoints" / "linear_probe.pt")
    return dict(out)


_PROBES: dict[str, tuple] = {}


def _probe(c: dict) -> tuple[dict, dict, dict]:
    """(figures, predictions per split, head state) of the dev-tuned linear probe of config `c`."""
    import torch
    from torchmetrics.functional.classification import multiclass_f1_score

    from layerfusion.callbacks.resource_monitor import peak_memory_mb, reset_peak_memory

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

    def predict(split: str) -> torch.Tensor:
        with torch.no_grad():
            return head({k: v.to(device) for k, v in feats[split].items()}).argmax(-1)

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
    pred = {s: predict(s) for s in ("val", "test")}
    preds = {s: (range(len(pred[s])), pred[s].cpu(), gold[s].cpu()) for s in ("val", "test")}
    out = {
        "test_acc": float((pred["test"] == gold["test"]).float().mean()),
        "test_f1": float(
            multiclass_f1_score(pred["test"], gold["test"], len(model.label_names), average="macro")
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


def settings_hash(cfg: dict) -> str:
    """SHA-256 of the fully resolved config (defaults filled in by the parser), logger excluded."""
    from layerfusion.cli import LayerFusionCLI

    class ParseOnly(LayerFusionCLI):
        def _set_seed(self) -> None:  # parsing only: no global seeding
            pass

        def instantiate_classes(self) -> None:
            pass

    cli = _cli(ParseOnly, cfg)
    resolved = json.loads(cli.parser.dump(cli.config, skip_none=False, format="json"))
    resolved.get("trainer", {}).pop("logger", None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def extraction_seconds(entries: list[Path]) -> float:
    """Cold extraction time recorded in the manifests of these cache entries (NaN when one lacks it)."""
    from layerfusion.features.cache import read_manifest

    return sum(read_manifest(e).get("build_seconds", math.nan) for e in entries)


def instantiate(cfg: dict):
    """Trainer, model and datamodule from a config dict, exactly as `layerfusion fit --config` builds them."""
    from layerfusion.cli import LayerFusionCLI

    cli = _cli(LayerFusionCLI, cfg)
    return cli.trainer, cli.model, cli.datamodule


def _cli(cli_class, cfg: dict):
    """`cli_class` (a LayerFusionCLI) over the config dict `cfg`, not over this command line."""
    from layerfusion.data.datamodule import TextClassificationDataModule
    from layerfusion.module import LayerFusionModule

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return cli_class(
            LayerFusionModule,
            TextClassificationDataModule,
            args=cfg,
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = argv


class _Predictions(L.Callback):
    """Collects (row index, prediction, gold) of the last validation and test epoch (one process)."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.rows["val"] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.rows["test"] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        self.rows["val"].append(_triple(outputs, batch))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        self.rows["test"].append(_triple(outputs, batch))

    def arrays(self, split: str) -> list:
        """`[index, pred, gold]` tensors of the split's last epoch."""
        import torch

        return [torch.cat(col) for col in zip(*self.rows[split])]


def _triple(outputs: dict, batch: dict):
    return batch["index"].cpu(), outputs["preds"].cpu(), batch["labels"].cpu()


# -- aggregation, significance, complementarity --------------------------------------------------


def aggregate(
    name: str,
    method: str,
    group: str,
    results: list[dict],
    extract_s: float = math.nan,
    extract_peak_mb: float = math.nan,
) -> dict:
    """One table row from the per-seed results of one (method, encoders)."""
    acc = [r["test_acc"] for r in results]
    return {
        "dataset": name,
        "method": method,
        "group": group,
        "encoders": results[0]["encoders"],
        "layers": results[0]["layers"],
        "test_acc_mean": statistics.fmean(acc),
        "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else None,
        "test_f1_mean": statistics.fmean(r["test_f1"] for r in results),
        "val_acc_mean": statistics.fmean(r["val_acc"] for r in results),
        "seeds": len(results),
        "extract_s": extract_s,
        "extract_peak_mb": extract_peak_mb,
        "train_s": statistics.fmean(r["train_s"] for r in results),
        "train_peak_mb": _max(r.get("train_peak_mb") for r in results),
    }


def table_from_runs(per_run: list[dict]) -> list[dict]:
    """The table's accuracy columns recomputed from per-seed rows (e.g. a `paper_runs.csv`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in per_run:
        groups.setdefault((r["dataset"], r["method"], r["encoders"]), []).append(r)
    return [aggregate(d, m, GROUP.get(m, "main"), rs) for (d, m, _), rs in groups.items()]


def best_single(rows: list[dict]) -> dict | None:
    """The single-encoder row with the highest mean dev accuracy (never chosen on test)."""
    single = [r for r in rows if "+" not in r["encoders"]]
    return max(single, key=lambda r: r["val_acc_mean"], default=None)


def significance(table: list[dict], per_run: list[dict]) -> None:
    """Add `vs`, `diff`, `diff_lo/hi`, `mcnemar_p_max` and `verdict` to each row of one dataset's table."""
    from layerfusion import analysis

    base = best_single(table)
    if base is None:
        return
    correct = {(r["method"], r["encoders"]): _correct(r, per_run) for r in table}
    ref_seeds, ref = correct[base["method"], base["encoders"]]
    for r in table:
        seeds, mine = correct[r["method"], r["encoders"]]
        common = [s for s in seeds if s in ref_seeds]
        a = [mine[seeds.index(s)] for s in common]
        b = [ref[ref_seeds.index(s)] for s in common]
        diff, lo, hi = analysis.paired_bootstrap(a, b)
        r.update(
            vs=f"{base['method']} {base['encoders']}",
            diff=diff,
            diff_lo=lo,
            diff_hi=hi,
            mcnemar_p_max=max(analysis.mcnemar_exact(x, y) for x, y in zip(a, b)),
            verdict="reference"
            if r is base
            else "better"
            if lo > 0
            else "worse"
            if hi < 0
            else "n.s.",
        )


def complementarity(table: list[dict], per_run: list[dict]) -> list[dict]:
    """Per pair of encoders: agreement of each encoder's best single-encoder row (by dev), per seed and split."""
    import itertools

    from layerfusion import analysis

    best = {}
    for r in table:
        if "+" not in r["encoders"] and (
            r["encoders"] not in best or r["val_acc_mean"] > best[r["encoders"]]["val_acc_mean"]
        ):
            best[r["encoders"]] = r
    out = []
    for ea, eb in itertools.combinations(best, 2):
        ra, rb = best[ea], best[eb]
        for seed in [x["seed"] for x in _runs_of(ra, per_run)]:
            for split in ("val", "test"):
                pa = analysis.read_predictions(
                    _run_dir(ra, seed, per_run) / f"predictions_{split}.csv"
                )
                pb = analysis.read_predictions(
                    _run_dir(rb, seed, per_run) / f"predictions_{split}.csv"
                )
                analysis.aligned(pa, pb, f"{ra['dataset']} {ea} vs {eb} seed {seed} ({split})")
                out.append(
                    {
                        "dataset": ra["dataset"],
                        "split": split,
                        "seed": seed,
                        "encoder_a": ea,
                        "row_a": ra["method"],
                        "encoder_b": eb,
                        "row_b": rb["method"],
                        **analysis.agreement(pa["pred"], pb["pred"], pa["gold"]),
                    }
                )
    return out


def _runs_of(row: dict, per_run: list[dict]) -> list[dict]:
    return [
        x
        for x in per_run
        if (x["dataset"], x["method"], x["encoders"])
        == (row["dataset"], row["method"], row["encoders"])
    ]


def _run_dir(row: dict, seed: int, per_run: list[dict]) -> Path:
    return Path(next(x["run_dir"] for x in _runs_of(row, per_run) if x["seed"] == seed))


def _correct(row: dict, per_run: list[dict]):
    """(seeds, per-seed 0/1 test correctness arrays) of one table row, from its prediction files."""
    from layerfusion import analysis

    seeds, arrays, index = [], [], None
    for x in _runs_of(row, per_run):
        p = analysis.read_predictions(Path(x["run_dir"]) / "predictions_test.csv")
        if index is not None and not (index == p["index"]).all():
            raise ConfigError(
                f"{x['run_dir']}: test predictions cover other rows than seed {seeds[0]}"
            )
        index = p["index"]
        seeds.append(x["seed"])
        arrays.append(p["pred"] == p["gold"])
    return seeds, arrays


# -- output --------------------------------------------------------------------------------------


def csv_rows(rows: list[dict], columns: list[str] | None = None) -> list[dict]:
    """Rows for a CSV file: `columns`, or the union of the rows' keys in first-seen order (a key a row
    lacks is left empty); floats rounded to 6 decimals."""
    if columns is None:
        columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in NOT_IN_CSV]
    return [{c: _cell(r.get(c)) for c in columns} for r in rows]


def read_runs(path: Path) -> list[dict]:
    """The rows of a `paper_runs.csv`, numbers parsed; unknown columns (e.g. the per-run `extract_s` of
    older versions) are kept as they are."""
    ints, texts = (
        {"seed", "epochs", "torch_threads", "lbfgs_iterations"},
        {"dataset", "method", "encoders", "layers", "device", "settings", "run_dir"},
    )
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append(
                {
                    k: v if k in texts or v in ("", None) else int(v) if k in ints else float(v)
                    for k, v in r.items()
                }
            )
    return rows


def gains(table: list[dict]) -> dict[str, dict]:
    """Per dataset: gated vs the better encoder's last layer and vs the best single-encoder row, both
    chosen by dev accuracy."""
    out = {}
    for name in dict.fromkeys(r["dataset"] for r in table):
        rows = [r for r in table if r["dataset"] == name]
        gated = next((r for r in rows if r["method"] == "gated"), None)
        last = [r for r in rows if r["method"] == "last_layer"]
        single = best_single(rows)
        if gated is None or not last:
            continue
        best_last = max(last, key=lambda r: r["val_acc_mean"])
        out[name] = {
            "gated": gated["test_acc_mean"],
            "best_last": best_last["test_acc_mean"],
            "best_last_row": f"last_layer {best_last['encoders']}",
            "gain_over_last": gated["test_acc_mean"] - best_last["test_acc_mean"],
            "best_single": single["test_acc_mean"],
            "best_single_row": f"{single['method']} {single['encoders']}",
            "gain_over_single": gated["test_acc_mean"] - single["test_acc_mean"],
            "verdict": gated.get("verdict"),
        }
    return out


def markdown(table: list[dict], per_run: list[dict], pairs: list[dict], args, wall: float) -> str:
    import torch

    reused, total = sum(bool(r.get("reused")) for r in per_run), len(per_run)
    command = (
        f"layerfusion reproduce {' '.join(args.configs)} --seeds {' '.join(map(str, args.seeds))} "
        f"--share {args.share}"
        + (f" --methods {' '.join(args.methods)}" if args.methods else "")
        + (f" --logger {args.logger}" if args.logger != "csv" else "")
    )
    lines = [
        "# layerfusion reproduction: " + ", ".join(dict.fromkeys(r["dataset"] for r in table)),
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {_cpus()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; Python {sys.version.split()[0]}.  ",
        f"Wall time of this invocation: {wall / 60:.1f} min; {reused} of {total} head runs were "
        "reused from an earlier invocation (same resolved config).",
        "",
        "Accuracy in %, mean ± std over seeds (test split; layers chosen on train/dev). "
        "vs best single: the test-accuracy difference to the best single-encoder row (chosen by dev "
        "accuracy), mean over seeds, with its paired bootstrap 95 % interval over test rows and the "
        "largest per-seed exact McNemar p; better / worse = the interval excludes 0, n.s. = it does not. "
        "`linear_probe` is convex and fitted full-batch, so its seeds agree. extract_s / extract_peak_mb: "
        "cold feature extraction of the row's encoders (train+dev+test), each encoder measured alone; "
        "train_s: head training wall time per seed, measured while other work may share the machine, so "
        "differences between methods of a few seconds are load, not method; train_peak_mb: peak memory of "
        "a training run on cached features (encoders loaded).",
        "",
    ]
    for name in dict.fromkeys(r["dataset"] for r in table):
        lines += [
            f"## {name}",
            "",
            "| method | encoders | layers | test acc | test macro-F1 | dev acc | vs best single [95 % CI] | McNemar p | extract_s | extract_peak_mb | train_s | train_peak_mb |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in table if r["dataset"] == name):
            method = r["method"] + (" *(ablation)*" if r["group"] == "ablation" else "")
            std = "" if r["test_acc_std"] is None else f" ± {100 * r['test_acc_std']:.2f}"
            vs = (
                "reference"
                if r.get("verdict") == "reference"
                else f"{100 * r['diff']:+.2f} [{100 * r['diff_lo']:+.2f}, {100 * r['diff_hi']:+.2f}] {r['verdict']}"
                if "diff" in r
                else ""
            )
            p = f"{r['mcnemar_p_max']:.3g}" if "mcnemar_p_max" in r and vs != "reference" else ""
            lines.append(
                f"| {method} | {r['encoders']} | {r['layers']} | {100 * r['test_acc_mean']:.2f}{std} | "
                f"{100 * r['test_f1_mean']:.2f} | {100 * r['val_acc_mean']:.2f} | {vs} | {p} | "
                f"{_num(r['extract_s'], 0)} | {_num(r['extract_peak_mb'], 0)} | {r['train_s']:.1f} | "
                f"{_num(r['train_peak_mb'], 0)} |"
            )
        lines.append("")
    g = gains(table)
    if g:
        lines += [
            "## Gains of `gated` (accuracy points; reference rows chosen by dev accuracy)",
            "",
            "| dataset | gated | better last_layer | gain | best single-encoder row | gain | significance |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, x in g.items():
            lines.append(
                f"| {name} | {100 * x['gated']:.2f} | {100 * x['best_last']:.2f} ({x['best_last_row']}) | "
                f"{100 * x['gain_over_last']:+.2f} | {100 * x['best_single']:.2f} ({x['best_single_row']}) | "
                f"{100 * x['gain_over_single']:+.2f} | {x['verdict'] or ''} |"
            )
        mean_gain = statistics.fmean(x["gain_over_last"] for x in g.values())
        per_single = ", ".join(f"{n} {100 * x['gain_over_single']:+.2f}" for n, x in g.items())
        lines += [
            f"| **mean** | | | **{100 * mean_gain:+.2f}** | | "
            f"**{100 * statistics.fmean(x['gain_over_single'] for x in g.values()):+.2f}** | |",
            "",
            f"Target 1, gated >= every single-encoder row (the best by dev): "
            f"{'met' if all(x['gain_over_single'] >= 0 for x in g.values()) else 'NOT met'} "
            f"({per_single}).  ",
            f"Target 2, mean gain over the better last_layer >= 1.5 points: "
            f"{'met' if mean_gain >= 0.015 else 'NOT met'} ({100 * mean_gain:+.2f}).",
            "",
        ]
    if pairs:
        lines += [
            "## Complementarity of the encoders (each encoder's best single-encoder row by dev; "
            "mean over seeds, % of rows)",
            "",
            "| dataset | split | A | B | both right | only A | only B | both wrong | oracle | kappa |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        keys = dict.fromkeys(
            (p["dataset"], p["split"], p["encoder_a"], p["encoder_b"]) for p in pairs
        )
        for d, split, a, b in keys:
            sel = [
                p
                for p in pairs
                if (p["dataset"], p["split"], p["encoder_a"], p["encoder_b"]) == (d, split, a, b)
            ]

            def pct(col: str, sel=sel) -> str:
                return f"{100 * statistics.fmean(p[col] / p['rows'] for p in sel):.2f}"

            lines.append(
                f"| {d} | {split} | {a} ({sel[0]['row_a']}) | {b} ({sel[0]['row_b']}) | {pct('both_right')} | "
                f"{pct('only_a')} | {pct('only_b')} | {pct('both_wrong')} | "
                f"{100 * statistics.fmean(p['oracle_acc'] for p in sel):.2f} | "
                f"{statistics.fmean(p['kappa'] for p in sel):.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _max(values) -> float:
    """The largest of the numbers given, ignoring None and NaN (NaN when none is left)."""
    nums = [v for v in values if v is not None and not math.isnan(v)]
    return max(nums) if nums else math.nan


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 6)
    return "" if v is None else v


def _num(v, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


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


# -- helpers -------------------------------------------------------------------------------------


def _layers(row: Row, encs: list[str], selections: dict, depth: dict[str, int]) -> dict | None:
    if row.layers == "all":
        return {k: list(range(depth[k])) for k in encs}
    if row.layers == "last":
        return {k: [depth[k] - 1] for k in encs}
    return {k: selections[row.layers][k] for k in encs}


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


def _fmt_layers(layers: dict | None) -> str:
    return " ".join(f"{k}:{','.join(map(str, v))}" for k, v in (layers or {}).items())


def _row_id(row: Row, encs: list[str]) -> str:
    return row.method if row.encoders == "all" else f"{row.method}-{encs[0]}"


def _spec_key(spec: dict) -> str:
    from layerfusion.encoders.frozen import EncoderSpec

    return EncoderSpec(**spec).key


def _is(cb: dict, *names: str) -> bool:
    return isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] in names


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    raise SystemExit(main())
