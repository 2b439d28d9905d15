"""Significance and cross-model complementarity of runs: `layerfusion analyze RUN_DIR...`.

Statistics over per-row predictions (`predictions_<split>.csv`: `index,pred,gold`, written into the run
directory by the RunReport / EvalPredictions callbacks of any `fit` + `test`, and by `layerfusion
reproduce`) and over cached dev features (those named in a reproduce run's `result.json`):

- **paired bootstrap**: 95 % interval of the accuracy difference of two rows, test rows resampled
  (the same resample for every seed; seed k of one row is paired with seed k of the other);
- **McNemar's exact test**: two-sided binomial test on the discordant rows of one seed;
- **agreement**: both right / only A right / only B right / both wrong, oracle accuracy (either right)
  and Cohen's kappa of the two prediction vectors (torchmetrics);
- **linear CKA** (Kornblith et al. 2019) between every (encoder, layer) pair of dev features.

`layerfusion analyze` compares every pair of the given run directories and writes `agreement.csv`,
`cka.csv` and `cka.png` under `--out`; `--logger wandb` also logs them as a W&B table and image.
`layerfusion analyze --from-results results` recomputes the table's statistics (`layerfusion.reproduce`:
two-level bootstrap, Holm, verdicts) from the committed per-row predictions and checks them.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch

from layerfusion.errors import ConfigError

SPLITS = ("val", "test")


# -- predictions -----------------------------------------------------------------------------------


def write_predictions(path: Path, index, pred, gold) -> Path:
    """Write `index,pred,gold` rows (sorted by row index) as CSV, atomically."""
    from layerfusion.files import write_csv

    rows = sorted(zip(map(int, index), map(int, pred), map(int, gold)))
    return write_csv(path, [{"index": i, "pred": p, "gold": g} for i, p, g in rows])


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    """`{"index", "pred", "gold"}` integer arrays of a predictions CSV, sorted by row index."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: analyze reads run directories with predictions_test.csv (and "
            "predictions_val.csv): a `fit` + `test` with the RunReport callback, or `layerfusion reproduce`"
        ) from None
    out = {}
    for col in ("index", "pred", "gold"):
        try:
            out[col] = np.array([int(r[col]) for r in rows], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path}: column {col!r} missing or not an integer ({err})") from None
    order = np.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


def aligned(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    """Raise unless two prediction sets cover the same rows with the same gold labels."""
    if not (np.array_equal(a["index"], b["index"]) and np.array_equal(a["gold"], b["gold"])):
        raise ConfigError(f"{what}: the two runs' predictions cover different rows or gold labels")


# -- significance ----------------------------------------------------------------------------------


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value of two paired 0/1 correctness vectors."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Accuracy difference A - B (mean over seeds) and its bootstrap interval over rows.

    `correct_a`, `correct_b`: `[seeds, rows]` 0/1 arrays, seed k of A paired with seed k of B.
    """
    a = np.atleast_2d(np.asarray(correct_a, float))
    b = np.atleast_2d(np.asarray(correct_b, float))
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    per_row = (a - b).mean(0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_row), size=(samples, len(per_row)))
    boot = per_row[idx].mean(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(per_row.mean()), float(lo), float(hi)


# -- complementarity -------------------------------------------------------------------------------


def agreement(pred_a, pred_b, gold, num_classes: int | None = None) -> dict[str, float]:
    """Both right / only A / only B / both wrong counts, oracle accuracy and Cohen's kappa of A vs B."""
    from torchmetrics.functional import cohen_kappa

    pa, pb, g = (np.asarray(x, dtype=np.int64) for x in (pred_a, pred_b, gold))
    ra, rb = pa == g, pb == g
    k = num_classes or int(max(pa.max(), pb.max(), g.max())) + 1
    kappa = cohen_kappa(
        torch.from_numpy(pa), torch.from_numpy(pb), task="multiclass", num_classes=k
    )
    return {
        "rows": len(g),
        "both_right": int((ra & rb).sum()),
        "only_a": int((ra & ~rb).sum()),
        "only_b": int((~ra & rb).sum()),
        "both_wrong": int((~ra & ~rb).sum()),
        "acc_a": float(ra.mean()),
        "acc_b": float(rb.mean()),
        "oracle_acc": float((ra | rb).mean()),
        "kappa": float(kappa),
    }


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same rows (`[N, d1]`, `[N, d2]`)."""
    return float(cka_matrix([x, y])[0, 1])


def cka_matrix(layers: list[torch.Tensor], max_rows: int = 2000) -> np.ndarray:
    """Linear CKA between every pair of `[N, d]` representations of the same N rows (first `max_rows`).

    Computed from centred Gram matrices: CKA(X, Y) = <K, L>_F / (||K||_F ||L||_F), K = Xc Xc^T.
    A representation that is the same for every row (e.g. a CLS token at layer 0) has no CKA: NaN.
    """
    grams = []
    for x in layers:
        x = x[:max_rows].double()
        scale = x.abs().max().clamp_min(1.0)
        x = x - x.mean(0, keepdim=True)
        k = (x @ x.T).flatten()
        constant = x.abs().max() <= 1e-9 * scale
        grams.append(torch.full_like(k, math.nan) if constant else k / k.norm())
    g = torch.stack(grams)
    return (g @ g.T).clamp(-1, 1).numpy()


def cka_table(
    features: dict[str, torch.Tensor], max_rows: int = 2000
) -> tuple[list[str], np.ndarray]:
    """Labels `encoder:layer` and the CKA matrix between every (encoder, layer) of `{encoder: [N, L, d]}`."""
    labels, reps = [], []
    for enc, feats in features.items():
        for layer in range(feats.shape[1]):
            labels.append(f"{enc}:{layer}")
            reps.append(feats[:max_rows, layer].float())
    return labels, cka_matrix(reps, max_rows)


def write_cka(labels: list[str], matrix: np.ndarray, csv_path: Path, png_path: Path, title: str):
    """The CKA matrix as a long CSV (`a,b,cka`) and a heatmap PNG."""
    from layerfusion import plots
    from layerfusion.files import write_csv

    rows = [
        {"a": a, "b": b, "cka": None if math.isnan(matrix[i, j]) else round(float(matrix[i, j]), 6)}
        for i, a in enumerate(labels)
        for j, b in enumerate(labels)
    ]
    write_csv(csv_path, rows)
    plots.matrix_heatmap(matrix, labels, png_path, title, vmin=0.0, vmax=1.0)
    return rows


def log_wandb(
    name: str, group: str, tables: dict[str, list[dict]], images: dict[str, Path], save_dir: Path
) -> None:
    """One W&B run (project `layerfusion-reproduce`; offline unless WANDB_MODE=online) with tables and images."""
    import os

    import wandb

    save_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project="layerfusion-reproduce",
        group=group,
        name=name,
        dir=str(save_dir),
        mode="online" if os.environ.get("WANDB_MODE") == "online" else "offline",
        reinit="create_new",
    )
    try:
        for key, rows in tables.items():
            if rows:
                cols = list(rows[0])
                run.log({key: wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
        for key, path in images.items():
            run.log({key: wandb.Image(str(path))})
    finally:
        run.finish()


# -- `layerfusion analyze` -------------------------------------------------------------------------


def analyze(run_dirs: list[Path], out: Path, logger: str = "none") -> list[Path]:
    """Agreement, significance and CKA of run directories; returns the files written."""
    from layerfusion.files import write_csv

    runs = [_load_run(d) for d in run_dirs]
    if len(runs) < 2:
        raise ConfigError("analyze needs at least two run directories to compare")
    rows = []
    for a, b in itertools.combinations(runs, 2):
        for split in SPLITS:
            pa, pb = a["predictions"].get(split), b["predictions"].get(split)
            if pa is None or pb is None:
                continue
            aligned(pa, pb, f"{a['dir']} vs {b['dir']} ({split})")
            ra, rb = pa["pred"] == pa["gold"], pb["pred"] == pb["gold"]
            diff, lo, hi = paired_bootstrap(ra, rb)
            rows.append(
                {
                    "split": split,
                    "run_a": str(a["dir"]),
                    "run_b": str(b["dir"]),
                    **agreement(pa["pred"], pb["pred"], pa["gold"]),
                    "diff": diff,
                    "diff_lo": lo,
                    "diff_hi": hi,
                    "mcnemar_p": mcnemar_exact(ra, rb),
                }
            )
    written = [write_csv(out / "agreement.csv", rows)]
    features = {}
    for r in runs:
        for enc, entry in r["features"].items():
            features.setdefault(enc, entry)
    images = {}
    cka_rows: list[dict] = []
    if features:
        from layerfusion.features.cache import open_entry

        labels, matrix = cka_table({e: open_entry(Path(p)) for e, p in features.items()})
        cka_rows = write_cka(
            labels, matrix, out / "cka.csv", out / "cka.png", "linear CKA, dev features"
        )
        written += [out / "cka.csv", out / "cka.png"]
        images["cka_heatmap"] = out / "cka.png"
    if logger == "wandb":
        log_wandb("analyze", "analyze", {"agreement": rows, "cka": cka_rows}, images, out / "wandb")
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry: `layerfusion analyze RUN_DIR RUN_DIR [...] [--out DIR] [--logger wandb]`, or
    `layerfusion analyze --from-results results`: recompute every accuracy, interval, p-value and verdict of
    `results/paper_table.csv` from `results/predictions/*.npz` alone and report any difference (exit 1)."""
    parser = argparse.ArgumentParser(prog="layerfusion analyze", description=__doc__.split("\n")[0])
    parser.add_argument(
        "runs",
        nargs="*",
        type=Path,
        help="run directories (trainer.default_root_dir of a fit + test with RunReport, or of reproduce)",
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        metavar="DIR",
        help="recompute DIR/paper_table.csv's statistics from DIR/predictions/*.npz and compare",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/analysis"), help="output directory"
    )
    parser.add_argument(
        "--logger",
        choices=["none", "wandb"],
        default="none",
        help="also log the tables to W&B (offline unless WANDB_MODE=online)",
    )
    args = parser.parse_args(argv)
    if args.from_results is not None:
        from layerfusion.files import write_csv
        from layerfusion.reproduce import COLUMNS, csv_rows, from_results

        rows, problems = from_results(args.from_results)
        cols = [c for c in COLUMNS if c in rows[0]] if rows else []
        print(write_csv(args.out / "paper_table_recomputed.csv", csv_rows(rows, cols)))
        for line in problems:
            print(line)
        print(
            f"{len(rows)} rows recomputed from {args.from_results / 'predictions'}: "
            + (f"{len(problems)} differences from the committed table" if problems else "all equal")
        )
        return 1 if problems else 0
    for path in analyze(args.runs, args.out, args.logger):
        print(path)
    return 0


def _load_run(d: Path) -> dict:
    """A run directory's predictions per split and the dev feature-cache entries in its `result.json`."""
    if not d.is_dir():
        raise ConfigError(f"run directory {d} does not exist")
    preds = {
        s: read_predictions(d / f"predictions_{s}.csv")
        for s in SPLITS
        if (d / f"predictions_{s}.csv").exists()
    }
    if "test" not in preds:
        read_predictions(d / "predictions_test.csv")  # raises the error that names the file
    try:
        result = json.loads((d / "result.json").read_text())
    except (OSError, ValueError):
        result = {}
    feats = {e: s["val"] for e, s in (result.get("features") or {}).items() if s.get("val")}
    return {"dir": d, "predictions": preds, "features": feats}
