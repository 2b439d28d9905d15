"""The table from per-seed results: aggregation, significance against the reference row,
complementarity of encoder pairs, and the CSV form."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from layerfusion.errors import ConfigError
from layerfusion.reproduce.grid import GROUP, NOT_IN_CSV


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


def _max(values) -> float:
    """The largest of the numbers given, ignoring None and NaN (NaN when none is left)."""
    nums = [v for v in values if v is not None and not math.isnan(v)]
    return max(nums) if nums else math.nan


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 6)
    return "" if v is None else v
