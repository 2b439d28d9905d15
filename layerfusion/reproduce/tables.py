"""The table from per-seed results: aggregation of the cost columns and gate weights, complementarity of
encoder pairs, and the CSV form (significance: `evidence`, from the packed predictions)."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from layerfusion.reproduce.grid import NOT_IN_CSV


def aggregate(
    name: str,
    method: str,
    group: str,
    results: list[dict],
    extract_s: float = math.nan,
    extract_peak_mb: float = math.nan,
) -> dict:
    """One table row from the per-seed results of one (training rows, method, encoders)."""
    acc = [r["test_acc"] for r in results]
    return {
        "dataset": name,
        "train_rows": results[0].get("train_rows", ""),
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
        "gate": mean_gate([r.get("gate", "") for r in results]),
        "train_s": statistics.fmean(r["train_s"] for r in results),
        "train_peak_mb": _max(r.get("train_peak_mb") for r in results),
    }


def mean_gate(gates: list[str]) -> str:
    """The mean over seeds of per-run gate weights (`"enc:w enc:w"`; empty when the runs have none)."""
    parsed = [
        dict((k, float(w)) for k, w in (x.rsplit(":", 1) for x in g.split())) for g in gates if g
    ]
    if not parsed:
        return ""
    return " ".join(f"{k}:{statistics.fmean(p[k] for p in parsed):.4f}" for k in parsed[0])


def complementarity(table: list[dict], per_run: list[dict]) -> list[dict]:
    """Per pair of encoders: agreement of each encoder's best single-encoder row (by dev), per seed and split."""
    import itertools

    from layerfusion import analysis

    best = {}
    for r in table:
        if (
            "+" not in r["encoders"]
            and r["group"] != "bound"
            and (
                r["encoders"] not in best or r["val_acc_mean"] > best[r["encoders"]]["val_acc_mean"]
            )
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
        if (x["dataset"], x.get("train_rows", ""), x["method"], x["encoders"])
        == (row["dataset"], row["train_rows"], row["method"], row["encoders"])
    ]


def _run_dir(row: dict, seed: int, per_run: list[dict]) -> Path:
    return Path(next(x["run_dir"] for x in _runs_of(row, per_run) if x["seed"] == seed))


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
        {"seed", "epochs", "torch_threads", "lbfgs_iterations", "train_rows"},
        {"dataset", "method", "encoders", "layers", "device", "settings", "run_dir", "gate"},
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


def _max(values) -> float:
    """The largest of the numbers given, ignoring None and NaN (NaN when none is left)."""
    nums = [v for v in values if v is not None and not math.isnan(v)]
    return max(nums) if nums else math.nan


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 6)
    return "" if v is None else v
