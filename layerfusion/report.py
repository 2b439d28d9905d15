"""`layerfusion report RUN_DIR...`: one results table (Markdown + CSV) and a bar plot from run directories."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from layerfusion import plots
from layerfusion.errors import LayerFusionError
from layerfusion.files import write_csv

COLUMNS = [
    "run",
    "dataset",
    "method",
    "encoders",
    "layers",
    "accuracy",
    "macro_f1",
    "extract_s",
    "train_s",
    "peak_mem_mb",
]


class ReportError(LayerFusionError, FileNotFoundError):
    """A directory given to `report` holds no finished run (or its files are not readable)."""


def collect(run_dirs: list[Path]) -> list[dict]:
    """One row per run directory that has `run.json` and `metrics_test.json` (written by RunReport)."""
    rows = []
    for d in run_dirs:
        run, metrics = _load(d / "run.json"), _load(d / "metrics_test.json")
        if run is None or metrics is None:
            what = "no such directory" if not d.is_dir() else "no run.json / metrics_test.json"
            raise ReportError(
                f"{d}: {what}; give run directories (trainer.default_root_dir) of runs that did `fit` then "
                "`test` with the RunReport callback"
            )
        res = _load(d / "resources.json") or {}
        fit = res.get("fit", {})
        rows.append(
            {
                "run": d.name,
                "dataset": run.get("dataset"),
                "method": run.get("head"),
                "encoders": " + ".join(
                    e.rstrip("/").split("/")[-1] for e in run.get("encoders", [])
                ),
                "layers": "; ".join(f"{k}: {v}" for k, v in (run.get("layers") or {}).items()),
                "accuracy": metrics.get("test_acc"),
                "macro_f1": metrics.get("test_f1"),
                "extract_s": fit.get("extract_s"),
                "train_s": fit.get("train_s"),
                "peak_mem_mb": max([s.get("peak_mem_mb", 0) for s in res.values()], default=None),
            }
        )
    return rows


def write(rows: list[dict], out: Path) -> list[Path]:
    """Write `results.md`, `results.csv` and `accuracy.png` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    write_csv(out / "results.csv", rows)
    names = [f"{r['dataset']}/{r['method']}/{r['run']}" for r in rows]
    plots.bars(
        names,
        [float(r["accuracy"] or 0) for r in rows],
        out / "accuracy.png",
        "test accuracy",
        "test accuracy per run",
    )
    return [out / "results.md", out / "results.csv", out / "accuracy.png"]


def main(argv: list[str] | None = None) -> int:
    """CLI entry: `layerfusion report RUN_DIR [RUN_DIR ...] [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="layerfusion report", description=__doc__)
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories (trainer.default_root_dir of each run)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/report"), help="output directory")
    args = parser.parse_args(argv)
    for path in write(collect(args.runs), args.out):
        print(path)
    return 0


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: not readable as JSON ({err})") from None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v <= 1 else f"{v:.1f}"
    return "" if v is None else str(v)
