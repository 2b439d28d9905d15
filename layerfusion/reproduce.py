"""`layerfusion reproduce`: the paper's table (baselines, selection, gated fusion, ablations) from fit configs.

For each experiment config (a normal `layerfusion fit` config, e.g. `configs/experiments/sst2.yaml`):

1. **Importance** (train/dev only): one `fit` with `limit_train_batches=0` runs the config's
   `LayerImportance` and `LayerSelection` callbacks; this extracts and caches the train/dev features of
   every encoder and writes `<out>/paper_importance/<dataset>.{csv,json}`. From the table come the
   `top_k` selection (the config's `LayerSelection`), a `cumulative` selection (`--share`) and each
   encoder's best layer (highest dev probe accuracy).
2. **Rows**: every method of `ROWS` is trained with each seed through the same `LightningCLI` path as
   `layerfusion fit` (config overrides only: seed, encoders, head, layers, callbacks, logger), tested on
   the best-val_acc checkpoint. Each run writes `result.json` under `--runs`; a rerun reuses results whose
   settings are unchanged, so an interrupted reproduction continues where it stopped.
3. **Table**: `<out>/paper_table.csv` (one row per dataset x method), `<out>/paper_runs.csv` (every
   seed) and `<out>/paper_table.md` (tables, gains, targets, machine, wall time).

Columns: `test_acc_mean/std` (std over seeds, ddof=1), `test_f1_mean` (macro-F1), `val_acc_mean`;
`extract_s`: the cold extraction time of the row's encoders over train/dev/test, read from the cache
manifests (so it is the same whether this run extracted or found the cache); `train_s`: mean head
training time (fit, cache reads included); `peak_mem_mb`: the largest peak, over the row's runs, of
process RSS (CPU, reset per run via /proc/self/clear_refs) or CUDA memory allocated (GPU), measured
from building the model to the end of its test: encoders loaded, features in memory, head training.
"""

from __future__ import annotations

import argparse
import copy
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

import yaml

from layerfusion.errors import ConfigError
from layerfusion.tracking import write_csv, write_json, write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
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
    "extract_s",
    "train_s",
    "peak_mem_mb",
]


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
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="layerfusion reproduce",
        description="Train the paper's table (baselines, selection, gated fusion, ablations) for each "
        "experiment config and write <out>/paper_table.{csv,md}.",
    )
    parser.add_argument("configs", nargs="+", help="experiment configs (layerfusion fit configs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
    table, per_run = [], []
    for path in args.configs:
        t, r = reproduce_dataset(Path(path), rows, args.seeds, args.share, out, runs, args.logger)
        table += t
        per_run += r
    wall = time.perf_counter() - start
    write_csv(out / "paper_table.csv", _rounded(table, COLUMNS))
    write_csv(
        out / "paper_runs.csv",
        _rounded(per_run, [k for k in per_run[0] if k != "reused"] if per_run else []),
    )
    write_text(out / "paper_table.md", markdown(table, per_run, args, wall))
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
) -> tuple[list[dict], list[dict]]:
    """All rows of one experiment config: (aggregated rows, per-seed results)."""
    if not path.is_file():
        raise ConfigError(f"experiment config {path} does not exist")
    cfg = yaml.safe_load(path.read_text())
    dataset = cfg.get("data", {}).get("dataset")
    if not dataset:
        raise ConfigError(f"{path}: data.dataset is not set")
    name = Path(str(dataset)).name
    selections, depth, entries = importance(cfg, name, share, out, runs / name)
    keys = list(depth)
    table, per_run = [], []
    for row in rows:
        for encs in [[k] for k in keys] if row.encoders == "*" else [keys]:
            layers = _layers(row, encs, selections, depth)
            results = [
                run_one(cfg, row, encs, layers, seed, runs / name / _row_id(row, encs), logger)
                for seed in seeds
            ]
            per_run += [{"dataset": name, **r} for r in results]
            extract_s = sum(extraction_seconds(entries[k]) for k in encs)
            table.append(aggregate(name, row, encs, layers, results, extract_s))
            log.info(
                "%s %s %s: test_acc %.4f ± %.4f",
                name,
                row.method,
                "+".join(encs),
                table[-1]["test_acc_mean"],
                table[-1]["test_acc_std"],
            )
    return table, per_run


def importance(
    cfg: dict, name: str, share: float, out: Path, run_dir: Path
) -> tuple[dict[str, dict[str, list[int]]], dict[str, int], dict[str, list[Path]]]:
    """Score the layers on train/dev (no head training): the selections, each encoder's depth, and
    each encoder's feature-cache entries of train/dev/test (the test entry is built by the first row)."""
    from layerfusion.callbacks import LayerImportance, LayerSelection
    from layerfusion.importance import ranked, scores_by_encoder, select_cumulative

    c = copy.deepcopy(cfg)
    callbacks = [
        cb
        for cb in c["trainer"].get("callbacks", [])
        if _is(cb, "LayerImportance", "LayerSelection")
    ]
    if not any(_is(cb, "LayerImportance") for cb in callbacks):
        raise ConfigError(f"{name}: the experiment config needs a LayerImportance callback")
    for cb in callbacks:
        if _is(cb, "LayerImportance"):
            cb.setdefault("init_args", {}).update(
                dirpath=str(out / "paper_importance"), filename=name
            )
    c["trainer"].update(
        callbacks=callbacks,
        limit_train_batches=0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
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
        k: [model.cache.entry_dir(model.cache.key(e, dm.texts(s), s)) for s in SPLITS]
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
) -> dict:
    """Train and test one head; reuse `result.json` when it was made with the same settings."""
    import torch
    from lightning.pytorch.loggers import WandbLogger

    from layerfusion.callbacks.resource_monitor import peak_memory_mb, reset_peak_memory

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
        logger=_logger(logger, row_dir, seed),
    )
    settings = hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()
    result_path = run_dir / "result.json"
    if result_path.is_file():
        try:
            done = json.loads(result_path.read_text())
        except ValueError:
            done = {}
        if done.get("settings") == settings:
            return {**done, "reused": True}
    gc.collect()
    reset_peak_memory()
    trainer, model, dm = instantiate(c)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - start - sum(model.extract_seconds.values())
    ckpt = trainer.checkpoint_callback
    metrics = trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)[0]
    for lg in trainer.loggers:  # close each W&B run: the next WandbLogger would reuse an open one
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()
    result = {
        "method": row.method,
        "encoders": "+".join(encs),
        "layers": _fmt_layers(layers),
        "seed": seed,
        "test_acc": metrics["test_acc"],
        "test_f1": metrics["test_f1"],
        "val_acc": float(ckpt.best_model_score),
        "epochs": trainer.current_epoch,
        "train_s": train_s,
        "peak_mem_mb": peak_memory_mb(),
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
        "settings": settings,
    }
    write_json(result_path, result)
    del trainer, model, dm
    return {**result, "reused": False}


def extraction_seconds(entries: list[Path]) -> float:
    """Cold extraction time recorded in the manifests of these cache entries (NaN when one lacks it)."""
    from layerfusion.features.cache import read_manifest

    return sum(read_manifest(e).get("build_seconds", math.nan) for e in entries)


def instantiate(cfg: dict):
    """Trainer, model and datamodule from a config dict, exactly as `layerfusion fit --config` builds them."""
    from layerfusion.cli import LayerFusionCLI
    from layerfusion.data.datamodule import TextClassificationDataModule
    from layerfusion.module import LayerFusionModule

    argv, sys.argv = sys.argv, sys.argv[:1]  # the config comes from `cfg`, not this command line
    try:
        cli = LayerFusionCLI(
            LayerFusionModule,
            TextClassificationDataModule,
            args=cfg,
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = argv
    return cli.trainer, cli.model, cli.datamodule


# -- aggregation and output ----------------------------------------------------------------------


def aggregate(
    name: str, row: Row, encs: list[str], layers: dict, results: list[dict], extract_s: float
) -> dict:
    acc = [r["test_acc"] for r in results]
    return {
        "dataset": name,
        "method": row.method,
        "group": row.group,
        "encoders": "+".join(encs),
        "layers": _fmt_layers(layers),
        "test_acc_mean": statistics.fmean(acc),
        "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "test_f1_mean": statistics.fmean(r["test_f1"] for r in results),
        "val_acc_mean": statistics.fmean(r["val_acc"] for r in results),
        "seeds": len(results),
        "extract_s": extract_s,
        "train_s": statistics.fmean(r["train_s"] for r in results),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in results),
    }


def gains(table: list[dict]) -> dict[str, dict[str, float]]:
    """Per dataset: gated vs the better encoder's last layer and vs the best single-encoder row."""
    out = {}
    for name in dict.fromkeys(r["dataset"] for r in table):
        rows = [r for r in table if r["dataset"] == name]
        gated = next((r for r in rows if r["method"] == "gated"), None)
        last = [r for r in rows if r["method"] == "last_layer"]
        single = [r for r in rows if "+" not in r["encoders"]]
        if gated is None or not last:
            continue
        best_last = max(last, key=lambda r: r["test_acc_mean"])
        best_single = max(single, key=lambda r: r["test_acc_mean"])
        out[name] = {
            "gated": gated["test_acc_mean"],
            "best_last": best_last["test_acc_mean"],
            "best_last_row": f"last_layer {best_last['encoders']}",
            "gain_over_last": gated["test_acc_mean"] - best_last["test_acc_mean"],
            "best_single": best_single["test_acc_mean"],
            "best_single_row": f"{best_single['method']} {best_single['encoders']}",
            "gain_over_single": gated["test_acc_mean"] - best_single["test_acc_mean"],
        }
    return out


def markdown(table: list[dict], per_run: list[dict], args, wall: float) -> str:
    import torch

    reused, total = sum(bool(r.get("reused")) for r in per_run), len(per_run)
    lines = [
        "# layerfusion reproduction: " + ", ".join(dict.fromkeys(r["dataset"] for r in table)),
        "",
        f"Command: `layerfusion reproduce {' '.join(args.configs)} --seeds {' '.join(map(str, args.seeds))}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {_cpus()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; Python {sys.version.split()[0]}.  ",
        f"Wall time of this invocation: {wall / 60:.1f} min; {reused} of {total} head runs were "
        "reused from an earlier invocation (same settings).",
        "",
        "Accuracy in %, mean ± std over seeds (test split; layers chosen on train/dev). extract_s: cold "
        "feature extraction of the row's encoders (train+dev+test); train_s: head training per seed; "
        "peak_mem_mb: peak process memory of a run.",
        "",
    ]
    for name in dict.fromkeys(r["dataset"] for r in table):
        lines += [
            f"## {name}",
            "",
            "| method | encoders | layers | test acc | test macro-F1 | dev acc | extract_s | train_s | peak_mem_mb |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in table if r["dataset"] == name):
            method = r["method"] + (" *(ablation)*" if r["group"] == "ablation" else "")
            lines.append(
                f"| {method} | {r['encoders']} | {r['layers']} | {100 * r['test_acc_mean']:.2f} ± "
                f"{100 * r['test_acc_std']:.2f} | {100 * r['test_f1_mean']:.2f} | "
                f"{100 * r['val_acc_mean']:.2f} | {r['extract_s']:.0f} | {r['train_s']:.1f} | "
                f"{r['peak_mem_mb']:.0f} |"
            )
        lines.append("")
    g = gains(table)
    if g:
        lines += [
            "## Gains of `gated` (accuracy points)",
            "",
            "| dataset | gated | better last_layer | gain | best single-encoder row | gain |",
            "|---|---|---|---|---|---|",
        ]
        for name, x in g.items():
            lines.append(
                f"| {name} | {100 * x['gated']:.2f} | {100 * x['best_last']:.2f} ({x['best_last_row']}) | "
                f"{100 * x['gain_over_last']:+.2f} | {100 * x['best_single']:.2f} ({x['best_single_row']}) | "
                f"{100 * x['gain_over_single']:+.2f} |"
            )
        mean_gain = statistics.fmean(x["gain_over_last"] for x in g.values())
        per_single = ", ".join(f"{n} {100 * x['gain_over_single']:+.2f}" for n, x in g.items())
        lines += [
            f"| **mean** | | | **{100 * mean_gain:+.2f}** | | "
            f"**{100 * statistics.fmean(x['gain_over_single'] for x in g.values()):+.2f}** |",
            "",
            f"Target 1, gated >= every single-encoder row: "
            f"{'met' if all(x['gain_over_single'] >= 0 for x in g.values()) else 'NOT met'} "
            f"({per_single}).  ",
            f"Target 2, mean gain over the better last_layer >= 1.5 points: "
            f"{'met' if mean_gain >= 0.015 else 'NOT met'} ({100 * mean_gain:+.2f}).",
            "",
        ]
    return "\n".join(lines)


def _rounded(rows: list[dict], columns: list[str]) -> list[dict]:
    """`rows` restricted to `columns`, floats rounded to 6 decimals (for the CSV files)."""
    return [{c: round(r[c], 6) if isinstance(r[c], float) else r[c] for c in columns} for r in rows]


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
