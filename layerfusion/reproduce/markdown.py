"""`paper_table.md`: the primary comparison, the tables per dataset and training-set size, the factorial,
the stacking bound and the complementarity, as Markdown."""

from __future__ import annotations

import math
import platform
import statistics
import sys

import numpy as np

from layerfusion.reproduce.grid import FACTORIAL
from layerfusion.reproduce.stats import ALPHA, LEVEL, SAMPLES, format_p


def markdown(table: list[dict], packed: dict, pairs: list[dict], args, wall: float) -> str:
    import torch

    command = (
        f"layerfusion reproduce {' '.join(args.configs)} --seeds {' '.join(map(str, args.seeds))} "
        f"--share {args.share}"
        + (f" --methods {' '.join(args.methods)}" if args.methods else "")
        + (f" --train-rows {' '.join(map(str, args.train_rows))}" if args.train_rows else "")
        + (f" --low-data {' '.join(args.low_data)}" if args.train_rows and args.low_data else "")
        + (
            f" --low-data-methods {' '.join(args.low_data_methods)}"
            if args.train_rows and list(args.low_data_methods) != list(FACTORIAL)
            else ""
        )
        + (f" --logger {args.logger}" if args.logger != "csv" else "")
    )
    lines = [
        "# layerfusion reproduction: " + ", ".join(dict.fromkeys(r["dataset"] for r in table)),
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {_cpus()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; Python {sys.version.split()[0]}.  ",
        f"Wall time of this invocation: {wall / 60:.1f} min.  ",
        "Every accuracy, interval, p-value and verdict below is recomputed from "
        "`predictions/<dataset>.npz` alone by `layerfusion analyze --from-results <out>`.",
        "",
        "Accuracy in %, mean over seeds (± std over seeds) on the test split; layers chosen on train/dev. "
        "Each family (one dataset, one training-set size) compares every row with its **reference**: the "
        "single-encoder row with the highest mean dev accuracy (ties: higher mean dev macro-F1, then the "
        "simpler method: linear_probe, last_layer, best_layer, single_last, single_best, selected). "
        f"diff: mean test-accuracy difference; [interval]: {100 * LEVEL:.0f} % two-level bootstrap "
        f"({SAMPLES} resamples of the seeds of each row, then of the test rows, paired); p: two-sided "
        f"bootstrap p (smallest possible {2 / (SAMPLES + 1):.2g}, shown as a bound); p (Holm): adjusted "
        f"within the family; verdict better / worse when p (Holm) < {ALPHA}, else n.s. The declared "
        "primary comparison is `gated` (both encoders) against the reference. `stacking` and "
        "`linear_probe` are deterministic (one fit, repeated per seed). gate: mean gate weight per encoder "
        "over test rows and seeds. train_s: head training wall time per seed on cached features.",
        "",
    ]
    families = list(dict.fromkeys((r["dataset"], r["train_rows"]) for r in table))
    lines += _table(
        "Primary comparison: gated (both encoders) vs the reference",
        "dataset | train rows | gated | reference | ref | diff [CI] | p | p (Holm) | verdict | tie on dev",
    )
    for d, n in families:
        fam = [r for r in table if (r["dataset"], r["train_rows"]) == (d, n)]
        gated = next((r for r in fam if r.get("primary")), None)
        ref = next((r for r in fam if r.get("verdict") == "reference"), None)
        if gated is None or ref is None:
            continue
        lines.append(
            f"| {d} | {n or 'all'} | {_acc(gated)} | {ref['method']} {ref['encoders']} | {_acc(ref)} | "
            f"{_diff(gated)} | {format_p(gated['p'], gated['p_bound'])} | "
            f"{format_p(gated['p_holm'], gated['p_holm_bound'])} | {gated['verdict']} | {_tie(ref)} |"
        )
    lines.append("")
    for d, n in families:
        fam = [r for r in table if (r["dataset"], r["train_rows"]) == (d, n)]
        lines += _table(
            f"{d}" + ("" if not n else f", {n} training rows"),
            "method | encoders | layers | test acc | macro-F1 | dev acc | seeds | vs reference: diff [CI] | "
            "p | p (Holm) | verdict | gate | train_s",
        )
        for r in fam:
            method = r["method"] + (f" *({r['group']})*" if r["group"] not in ("main",) else "")
            if r.get("primary"):
                method = f"**{method}** (primary)"
            lines.append(
                f"| {method} | {r['encoders']} | {r['layers']} | {_acc(r, std=True)} | "
                f"{100 * r['test_f1_mean']:.2f} | {100 * r['val_acc_mean']:.2f} | {r['seeds']} | "
                f"{_diff(r)} | {format_p(r.get('p'), r.get('p_bound'))} | "
                f"{format_p(r.get('p_holm'), r.get('p_holm_bound'))} | {r.get('verdict', '')} | "
                f"{r.get('gate', '')} | {r['train_s']:.1f} |"
            )
        ref = next((r for r in fam if r.get("verdict") == "reference"), None)
        if ref is not None and ref.get("ref_tied"):
            lines += [
                "",
                f"Tie on dev accuracy: {ref['method']} {ref['encoders']} (reference) and {ref['ref_tied']}. "
                f"Verdicts that change with the other as reference: {ref['tie_changes']}.",
            ]
        lines.append("")
    lines += _factorial(table, families) + _stacking(table, packed)
    if pairs:
        lines += _table(
            "Complementarity of the encoders (each encoder's best single-encoder row by dev; "
            "mean over seeds, % of rows)",
            "dataset | split | A | B | both right | only A | only B | both wrong | oracle | kappa",
        )
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


def _table(title: str, columns: str, note: str = "") -> list[str]:
    """A section's heading, optional note and table header (`columns`: names joined by " | ")."""
    note_lines = [note, ""] if note else []
    return [
        f"## {title}",
        "",
        *note_lines,
        f"| {columns} |",
        "|---" * (columns.count(" | ") + 1) + "|",
    ]


def _acc(r: dict, std: bool = False) -> str:
    tail = f" ± {100 * r['test_acc_std']:.2f}" if std and r.get("test_acc_std") is not None else ""
    return f"{100 * r['test_acc_mean']:.2f}{tail}"


def _diff(r: dict) -> str:
    if r.get("diff") is None or r.get("verdict") == "reference":
        return "reference" if r.get("verdict") == "reference" else ""
    return f"{100 * r['diff']:+.2f} [{100 * r['diff_lo']:+.2f}, {100 * r['diff_hi']:+.2f}]"


def _tie(ref: dict) -> str:
    return (
        f"with {ref['ref_tied']}; changes: {ref['tie_changes']}" if ref.get("ref_tied") else "none"
    )


def _factorial(table: list[dict], families: list) -> list[str]:
    """One head (gated) on {the better encoder by dev, both} x {last, best dev layer, top-k}."""
    lines = _table(
        "Factorial: one head (gated), layers x encoders",
        "dataset | train rows | encoder | one: last | one: best | one: top-k | both: last | both: best | "
        "both: top-k | fusion effect (top-k) | layers effect (both)",
        "Test accuracy; the single-encoder cells use the encoder whose `selected` row has the higher "
        "mean dev accuracy. layers effect: top-k minus last layer; fusion effect: both minus one.",
    )
    for d, n in families:
        fam = {
            (r["method"], r["encoders"]): r
            for r in table
            if (r["dataset"], r["train_rows"]) == (d, n) and r["method"] in FACTORIAL
        }
        singles = [r for (m, _), r in fam.items() if m == "selected"]
        both = [r for (m, e), r in fam.items() if m == "gated"]
        if not singles or not both:
            continue
        enc = max(singles, key=lambda r: r["val_acc_mean"])["encoders"]
        pair = both[0]["encoders"]
        cells = [fam.get((m, enc)) for m in FACTORIAL[:3]] + [
            fam.get((m, pair)) for m in FACTORIAL[3:]
        ]
        acc = [None if c is None else c["test_acc_mean"] for c in cells]
        fusion = _pts(acc[5], acc[2])
        layers = _pts(acc[5], acc[3])
        lines.append(
            f"| {d} | {n or 'all'} | {enc} | "
            + " | ".join("" if a is None else f"{100 * a:.2f}" for a in acc)
            + f" | {fusion} | {layers} |"
        )
    return lines + [""]


def _pts(a, b) -> str:
    return "" if a is None or b is None else f"{100 * (a - b):+.2f}"


def _stacking(table: list[dict], packed: dict) -> list[str]:
    """Stacking against the oracle of the two encoders' linear probes (either right) on test."""
    lines = _table(
        "Stacking bound (full data)",
        "dataset | reference | stacking | oracle of the probes | headroom reached",
        "oracle: a row counts as right when either encoder's linear_probe is right; headroom reached: "
        "(stacking - reference) / (oracle - reference).",
    )
    for d, p in packed.items():
        fam = [r for r in table if r["dataset"] == d and not r["train_rows"]]
        stack = next((r for r in fam if r["method"] == "stacking"), None)
        ref = next((r for r in fam if r.get("verdict") == "reference"), None)
        probes = [
            i
            for i, m in enumerate(p["runs"])
            if m["method"] == "linear_probe" and not m["train_rows"]
        ]
        if stack is None or ref is None or not probes:
            continue
        first = {}
        for i in probes:
            first.setdefault(p["runs"][i]["encoders"], i)
        right = np.stack([p["pred_test"][i] == p["gold_test"] for i in first.values()])
        oracle = float(right.any(0).mean())
        room = oracle - ref["test_acc_mean"]
        share = (stack["test_acc_mean"] - ref["test_acc_mean"]) / room if room > 0 else math.nan
        lines.append(
            f"| {d} | {_acc(ref)} ({ref['method']} {ref['encoders']}) | {_acc(stack)} | "
            f"{100 * oracle:.2f} | {100 * share:.0f} % |"
        )
    return lines + [""]


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
