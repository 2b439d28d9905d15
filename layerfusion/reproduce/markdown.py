"""`paper_table.md`: the table, the gains of `gated` and the complementarity, as Markdown."""

from __future__ import annotations

import math
import platform
import statistics
import sys

from layerfusion.reproduce.tables import gains


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


def _num(v, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
