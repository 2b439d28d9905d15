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

The package: `grid` (methods and columns), `prepare` (extraction, importance), `runner` (head runs),
`probe` (linear probe and stacking rows), `tables` (aggregation, complementarity), `evidence` and `stats`
(significance), `markdown` (the report). Configs are built and hashed by
`layerfusion.cli.build_cli` / `resolved_config_hash`, as `layerfusion fit` builds them.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from layerfusion.errors import ConfigError
from layerfusion.files import write_csv, write_text
from layerfusion.reproduce import evidence
from layerfusion.reproduce.grid import (
    COLUMNS,
    FACTORIAL,
    FROM_PREDICTIONS,
    GROUP,
    L2_GRID,
    ROWS,
    SPLITS,
    Row,
)
from layerfusion.reproduce.markdown import markdown
from layerfusion.reproduce.prepare import extract_features, importance, instantiate
from layerfusion.reproduce.runner import reproduce_dataset, run_one
from layerfusion.reproduce.tables import aggregate, complementarity, csv_rows, read_runs

__all__ = [
    "COLUMNS",
    "FACTORIAL",
    "GROUP",
    "L2_GRID",
    "ROWS",
    "SPLITS",
    "Row",
    "aggregate",
    "complementarity",
    "csv_rows",
    "evidence",
    "extract_features",
    "from_results",
    "importance",
    "instantiate",
    "main",
    "markdown",
    "read_runs",
    "reproduce_dataset",
    "run_one",
]

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="layerfusion reproduce",
        description="Train the paper's table (baselines, selection, gated fusion, ablations) for each "
        "experiment config and write <out>/paper_table.{csv,md}.",
    )
    parser.add_argument("configs", nargs="+", help="experiment configs (layerfusion fit configs)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=list(range(10)), help="seeds per row (default: 0-9)"
    )
    parser.add_argument("--share", type=float, default=0.5, help="cumulative selection share")
    parser.add_argument("--out", default="results", help="where the tables go")
    parser.add_argument("--runs", default="runs/reproduce", help="per-run logs and checkpoints")
    parser.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    parser.add_argument(
        "--train-rows",
        type=int,
        nargs="*",
        default=[],
        help="low-data arm: the factorial rows again on this many training rows each (e.g. 50 200 1000)",
    )
    parser.add_argument(
        "--low-data",
        nargs="*",
        metavar="CONFIG_STEM",
        help="run the --train-rows arm only for these configs (by file stem, e.g. sst2; default: all)",
    )
    parser.add_argument(
        "--low-data-methods",
        nargs="*",
        default=list(FACTORIAL),
        help="the rows of the --train-rows arm (default: the factorial rows)",
    )
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="train nothing: tabulate the rows whose every seed has finished in an earlier invocation",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="head runs at once, each in its own process with one torch thread (default 1)",
    )
    parser.add_argument(
        "--logger",
        choices=["csv", "wandb"],
        default="csv",
        help="per-run logger: CSV files, or W&B (project layerfusion-reproduce, group = dataset; "
        "offline unless WANDB_MODE=online)",
    )
    args = parser.parse_args(argv)
    from layerfusion.cli import log_to_stderr

    log_to_stderr()
    start = time.perf_counter()
    known = {r.method for r in ROWS}
    unknown = set(args.methods or []) - known
    if unknown:
        raise ConfigError(f"unknown methods {sorted(unknown)}; choose from {sorted(known)}")
    missing = [p for p in args.configs if not Path(p).is_file()]
    if missing:  # before any training: a typo in the last config must not surface an hour later
        raise ConfigError(f"experiment config {', '.join(missing)} does not exist")
    if any(n < 1 for n in args.train_rows):
        raise ConfigError(f"--train-rows must be positive numbers of rows, got {args.train_rows}")
    rows = [r for r in ROWS if not args.methods or r.method in args.methods]
    out, runs = Path(args.out), Path(args.runs)
    table, per_run, pairs, packed = [], [], [], {}
    for path in args.configs:
        t, r, p = reproduce_dataset(
            Path(path),
            rows,
            args.seeds,
            args.share,
            out,
            runs,
            args.logger,
            args.train_rows if args.low_data is None or Path(path).stem in args.low_data else [],
            args.jobs,
            args.low_data_methods,
            args.reuse_only,
        )
        if not t:  # --reuse-only and nothing finished
            continue
        name = t[0]["dataset"]
        packed[name] = evidence.pack(r)
        table += merge(t, evidence.evidence_table(name, packed[name]))
        per_run += r
        pairs += p
    wall = time.perf_counter() - start
    # everything is rendered before anything is written: a failure leaves the old tables intact
    files = {
        out / "paper_table.csv": csv_rows(table, COLUMNS),
        out / "paper_runs.csv": csv_rows(per_run),
        out / "paper_complementarity.csv": csv_rows(pairs),
    }
    text = markdown(table, packed, pairs, args, wall)
    for name, arrays in packed.items():
        evidence.save(out / "predictions" / f"{name}.npz", arrays)
    for path, content in files.items():
        write_csv(path, content)
    write_text(out / "paper_table.md", text)
    log.info("wrote %s, %s (%.0f s)", out / "paper_table.csv", out / "paper_table.md", wall)
    return 0


def merge(table: list[dict], computed: list[dict]) -> list[dict]:
    """The runs' aggregated rows (costs, gate) with the columns computed from the predictions."""
    by = {(r["train_rows"], r["method"], r["encoders"]): r for r in computed}
    return [{**r, **by[r["train_rows"], r["method"], r["encoders"]]} for r in table]


def from_results(results: Path, samples: int | None = None) -> tuple[list[dict], list[str]]:
    """Recompute every prediction-derived column of `<results>/paper_table.csv` from
    `<results>/predictions/*.npz` alone: (recomputed rows, differences from the committed table)."""
    import csv

    written = list(csv.DictReader((results / "paper_table.csv").open()))
    rows, problems = [], []
    for name in dict.fromkeys(w["dataset"] for w in written):
        rows += evidence.evidence_table(
            name,
            evidence.load(results / "predictions" / f"{name}.npz"),
            **({"samples": samples} if samples else {}),
        )
    mine = {
        (str(r["dataset"]), str(r["train_rows"]), r["method"], r["encoders"]): r
        for r in csv_rows(rows)
    }
    for w in written:
        r = mine.pop((w["dataset"], w["train_rows"], w["method"], w["encoders"]), None)
        if r is None:
            problems.append(f"{w['dataset']} {w['method']} {w['encoders']}: not in the predictions")
            continue
        for col in FROM_PREDICTIONS:
            if str(r[col]) != w[col]:
                problems.append(
                    f"{w['dataset']} n={w['train_rows'] or 'all'} {w['method']} {w['encoders']} "
                    f"{col}: committed {w[col]!r}, recomputed {r[col]!r}"
                )
    problems += [f"{k}: in the predictions, not in the table" for k in mine]
    return rows, problems
