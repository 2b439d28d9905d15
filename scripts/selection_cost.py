"""What another layer selection costs in test accuracy, as head runs rather than a probe proxy.

    python scripts/selection_cost.py --config configs/experiments/mr.yaml \
        --stability results/selection_stability/mr.json --predictions results/predictions/mr.npz \
        [--which worst|all] [--seeds 0 1 2 3 4 5 6 7 8 9] [--jobs 2] [--runs runs/selection_cost] \
        [--out results/selection_stability]

`scripts/importance_sample.py` records, per sample seed, the top-k layers that importance picks on a
train sample, and how much full-data dev probe accuracy those layers give up. This script trains the
method's row (`gated`: both encoders, the gated head) on such an alternative selection with every seed,
through the same `LightningCLI` fit as `layerfusion reproduce` (`reproduce.run_one`), and compares its
test predictions with the committed `gated` rows of `--predictions` (the full-data selection) by the
table's two-level bootstrap (seeds, then test rows), Holm-corrected over the alternatives.

`--which worst` (default): the sample seed whose selection gives up the most dev probe accuracy summed
over the encoders; `all`: every distinct selection of the samples; `other-dtype`: the selection made on
features of the other precision (`importance_sample.py --other-dtype`).

Writes `<out>/<stem>_cost.json` and `<out>/<stem>_cost.md` (`<stem>`: the `--stability` file's, e.g. `mr`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def alternatives(stability: dict, which: str) -> list[dict]:
    """The selections to train: `{source, seeds, selection, probe_acc_shortfall}`; the samples' (the
    full-data one left out) or, for `other-dtype`, the one made on features of the other precision."""
    full = stability["full"]["selection"]
    if which == "other-dtype":
        other = stability["other_dtype"]
        sel = {k: sorted(v) for k, v in other["selection"].items()}
        short = other["probe_acc_shortfall"]
        return [
            {
                "source": f"{other['dtype']} features",
                "seeds": [],
                "selection": sel,
                "probe_acc_shortfall": short,
                "sum": float(sum(short.values())),
            }
        ]
    found: dict[str, dict] = {}
    for s in stability["samples"]:
        sel = {k: sorted(v) for k, v in s["selection"].items()}
        if sel == {k: sorted(v) for k, v in full.items()}:
            continue
        short = float(sum(s["probe_acc_shortfall"].values()))
        alt = found.setdefault(
            json.dumps(sel, sort_keys=True),
            {
                "seeds": [],
                "selection": sel,
                "probe_acc_shortfall": s["probe_acc_shortfall"],
                "sum": short,
            },
        )
        alt["seeds"].append(s["seed"])
    for alt in found.values():
        alt["source"] = "sample seed " + ", ".join(map(str, alt["seeds"]))
    alts = sorted(found.values(), key=lambda a: (-a["sum"], a["seeds"][0]))
    return alts[:1] if which == "worst" else alts


def committed_gated(packed: dict) -> tuple[np.ndarray, list[int]]:
    """0/1 test correctness `[seeds, rows]` of the committed full-data `gated` rows, and their seeds."""
    idx = [
        i for i, r in enumerate(packed["runs"]) if r["method"] == "gated" and not r["train_rows"]
    ]
    if not idx:
        raise SystemExit("the predictions file has no full-data gated rows")
    correct = packed["pred_test"][idx] == packed["gold_test"][None, :]
    return correct, [int(packed["runs"][i]["seed"]) for i in idx]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="an experiment config")
    parser.add_argument("--stability", required=True, help="scripts/importance_sample.py's JSON")
    parser.add_argument(
        "--predictions", required=True, help="reproduce's predictions/<dataset>.npz"
    )
    parser.add_argument("--which", choices=["worst", "all", "other-dtype"], default="worst")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs", default=str(REPO / "runs" / "selection_cost"))
    parser.add_argument("--out", default=str(REPO / "results" / "selection_stability"))
    args = parser.parse_args()

    from layerfusion.analysis import aligned, read_predictions
    from layerfusion.cli import log_to_stderr
    from layerfusion.files import write_json, write_text
    from layerfusion.reproduce import evidence, stats
    from layerfusion.reproduce.grid import ROWS, _fmt_layers
    from layerfusion.reproduce.runner import run_many

    log_to_stderr()
    start = time.perf_counter()
    cfg = yaml.safe_load(Path(args.config).read_text())
    name = Path(str(cfg["data"]["dataset"])).name
    stability = json.loads(Path(args.stability).read_text())
    packed = evidence.load(Path(args.predictions))
    reference, ref_seeds = committed_gated(packed)
    row = next(r for r in ROWS if r.method == "gated")
    encs = list(stability["full"]["selection"])
    alts = alternatives(stability, args.which)
    tasks = []
    for a in alts:
        tag = (
            "sample-seed" + "-".join(map(str, a["seeds"])) if a["seeds"] else a["source"].split()[0]
        )
        row_dir = Path(args.runs) / name / f"gated-{tag}"
        a["row_dir"] = str(row_dir)
        tasks += [(cfg, row, encs, a["selection"], s, row_dir) for s in args.seeds]
    done = iter(run_many(tasks, args.jobs))
    index = {"index": packed["index_test"], "gold": packed["gold_test"]}
    full = {"method": "gated", "encoders": "full-data selection"}
    correct = {id(full): reference}
    for a in alts:
        a["runs"] = [next(done) for _ in args.seeds]
        right = []
        for r in a["runs"]:
            p = read_predictions(Path(r["run_dir"]) / "predictions_test.csv")
            aligned(index, p, r["run_dir"])
            right.append(p["pred"] == p["gold"])
        correct[id(a)] = np.stack(right)
        a["test_acc"] = [float(r["test_acc"]) for r in a["runs"]]
    # the table's comparison: two-level bootstrap against the reference, Holm over the others
    compared = evidence._compare([full, *alts], full, correct, stats.SAMPLES)
    for a in alts:
        a["vs_full_selection"] = compared[id(a)]
    result = {
        "dataset": name,
        "config": args.config,
        "which": args.which,
        "full_selection": stability["full"]["selection"],
        "full_selection_test_acc": reference.mean(1).tolist(),
        "full_selection_seeds": ref_seeds,
        "seeds": args.seeds,
        "alternatives": [{k: v for k, v in a.items() if k != "runs"} for a in alts],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    out, stem = Path(args.out), Path(args.stability).stem  # mr.json -> mr_cost.json
    write_json(out / f"{stem}_cost.json", result)
    lines = [
        f"# {name}: the `gated` row on another importance run's layers vs on the full-data selection",
        "",
        f"`python scripts/selection_cost.py --config {args.config} --which {args.which}`; {len(args.seeds)} "
        f"seeds per selection; full-data selection {_fmt_layers(stability['full']['selection'])}: test "
        f"accuracy {100 * reference.mean():.2f} ({len(ref_seeds)} committed seeds). Difference: alternative "
        "minus full-data selection, points, two-level bootstrap 95 % interval, Holm over the alternatives.",
        "",
        "| selection from | layers | dev probe-acc shortfall | test acc | difference [95 % CI] | Holm p | verdict |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for a in alts:
        c = a["vs_full_selection"]
        short = " ".join(
            f"{k.split('-')[1]} {100 * v:+.2f}" for k, v in a["probe_acc_shortfall"].items()
        )
        lines.append(
            f"| {a['source']} | {_fmt_layers(a['selection'])} | {short} | "
            f"{100 * np.mean(a['test_acc']):.2f} | {100 * c['diff']:+.2f} [{100 * c['diff_lo']:+.2f}, "
            f"{100 * c['diff_hi']:+.2f}] | {stats.format_p(c['p_holm'], c['p_holm_bound'])} | "
            f"{c['verdict']} |"
        )
    write_text(out / f"{stem}_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
