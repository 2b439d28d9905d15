"""Per-row predictions of every run, packed into one compressed file per dataset, and the table's accuracy and
significance columns computed from those files alone.

`results/predictions/<dataset>.npz` holds `gold_val`/`gold_test` (class ids), `index_val`/`index_test` (row
indices of the split), `pred_val` `[runs, dev rows]`, `pred_test` `[runs, test rows]` and `runs` (JSON: one
`{train_rows, method, encoders, layers, seed}` per run, in table order). `evidence_table` turns such a file into
the table's rows: means over seeds, the reference chosen on dev, each comparison's two-level bootstrap
interval and p, Holm's adjustment within the family (dataset x training rows) and the verdicts.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from layerfusion.errors import ConfigError
from layerfusion.reproduce import stats
from layerfusion.reproduce.grid import GROUP, PRIMARY

SPLITS = ("val", "test")


def pack(per_run: list[dict]) -> dict[str, np.ndarray]:
    """The arrays of one dataset's runs (each run's `predictions_{val,test}.csv` in its `run_dir`)."""
    from layerfusion.analysis import aligned, read_predictions

    packed: dict[str, list] = {f"pred_{s}": [] for s in SPLITS}
    meta, first = [], {}
    for r in per_run:
        for s in SPLITS:
            p = read_predictions(Path(r["run_dir"]) / f"predictions_{s}.csv")
            if s in first:
                aligned(first[s], p, f"{r['run_dir']} ({s})")
            else:
                first[s] = p
            packed[f"pred_{s}"].append(p["pred"])
        meta.append(
            {k: r.get(k, "") for k in ("train_rows", "method", "encoders", "layers", "seed")}
        )
    out = {f"pred_{s}": np.stack(packed[f"pred_{s}"]).astype(np.int16) for s in SPLITS}
    for s in SPLITS:
        out[f"gold_{s}"] = first[s]["gold"].astype(np.int16)
        out[f"index_{s}"] = first[s]["index"].astype(np.int32)
    out["runs"] = meta
    return out


def save(path: Path, packed: dict) -> Path:
    """`pack`'s arrays as one compressed `.npz` (`runs` as a JSON string), atomically."""
    from layerfusion.files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{**packed, "runs": np.array(json.dumps(packed["runs"]))})

    atomic_write(path, write)
    return path


def load(path: Path) -> dict:
    """A packed file's arrays, `runs` decoded."""
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: `layerfusion reproduce` writes it") from None
    out["runs"] = json.loads(str(out["runs"]))
    return out


def evidence_table(dataset: str, packed: dict, samples: int = stats.SAMPLES) -> list[dict]:
    """The table's rows of one dataset from its packed predictions (columns `grid.FROM_PREDICTIONS` and the
    row identity), families by training rows, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(packed["runs"]):
        groups.setdefault((r["train_rows"], r["method"], r["encoders"]), []).append(i)
    rows, correct = [], {}
    for (n, method, encoders), idx in groups.items():
        idx = sorted(idx, key=lambda i: packed["runs"][i]["seed"])
        right = {s: packed[f"pred_{s}"][idx] == packed[f"gold_{s}"] for s in SPLITS}
        f1 = {
            s: [stats.macro_f1(p, packed[f"gold_{s}"]) for p in packed[f"pred_{s}"][idx]]
            for s in SPLITS
        }
        acc = right["test"].mean(1)
        row = {
            "dataset": dataset,
            "train_rows": n,
            "method": method,
            "group": GROUP.get(method, "main"),
            "encoders": encoders,
            "layers": packed["runs"][idx[0]]["layers"],
            "test_acc_mean": float(acc.mean()),
            "test_acc_std": statistics.stdev(acc.tolist()) if len(acc) > 1 else None,
            "test_f1_mean": statistics.fmean(f1["test"]),
            "val_acc_mean": float(right["val"].mean()),
            "val_f1_mean": statistics.fmean(f1["val"]),
            "seeds": len(idx),
        }
        rows.append(row)
        correct[id(row)] = right["test"]
    for n in dict.fromkeys(r["train_rows"] for r in rows):
        significance([r for r in rows if r["train_rows"] == n], correct, samples)
    return rows


def significance(family: list[dict], correct: dict, samples: int = stats.SAMPLES) -> None:
    """Add `vs`, `diff`, `diff_lo/hi`, `p`, `p_holm` (+ `_bound`), `verdict`, `primary`, `ref_tied` and
    `tie_changes` to the rows of one family; `correct[id(row)]`: the row's `[seeds, test rows]` 0/1 array."""
    ref, tied = stats.choose_reference(family)
    if ref is None:
        return
    verdicts = _compare(family, ref, correct, samples)
    for r in family:
        r.update(verdicts[id(r)], primary=_is_primary(r), ref_tied="", tie_changes="")
    ref.update(verdict="reference")
    if tied:
        changes = []
        for alt in tied:
            other = _compare(family, alt, correct, samples)
            changes += [
                f"{_name(r)}: {verdicts[id(r)]['verdict']} -> {other[id(r)]['verdict']}"
                for r in family
                if r is not ref
                and r is not alt
                and other[id(r)]["verdict"] != verdicts[id(r)]["verdict"]
            ]
        ref.update(
            ref_tied="; ".join(_name(r) for r in tied),
            tie_changes="; ".join(changes) or "none",
        )


def _compare(family: list[dict], ref: dict, correct: dict, samples: int) -> dict[int, dict]:
    """Every other row of the family against `ref`: figures and Holm-corrected verdicts."""
    others = [r for r in family if r is not ref]
    out = {}
    for r in others:
        b = stats.two_level_bootstrap(correct[id(r)], correct[id(ref)], samples)
        out[id(r)] = {
            "vs": _name(ref),
            "diff": b["diff"],
            "diff_lo": b["lo"],
            "diff_hi": b["hi"],
            "p": b["p"],
            "p_bound": b["p_bound"],
        }
    p = [out[id(r)]["p"] for r in others]
    adjusted = stats.holm(p)
    bounds = stats.holm_bounds(p, [out[id(r)]["p_bound"] for r in others])
    for r, q, bound in zip(others, adjusted, bounds):
        out[id(r)].update(
            p_holm=q, p_holm_bound=bound, verdict=stats.verdict(out[id(r)]["diff"], q)
        )
    out[id(ref)] = {
        "vs": "",
        "diff": None,
        "diff_lo": None,
        "diff_hi": None,
        "p": None,
        "p_bound": None,
        "p_holm": None,
        "p_holm_bound": None,
        "verdict": "reference",
    }
    return out


def _is_primary(row: dict) -> bool:
    return row["method"] == PRIMARY and "+" in row["encoders"]


def _name(row: dict) -> str:
    return f"{row['method']} {row['encoders']}"
