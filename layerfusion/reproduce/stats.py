"""The table's statistics: a two-level bootstrap over seeds and test rows, Holm–Bonferroni within a family,
and a reference row chosen on dev with a tie rule.

- **Interval and p-value** (`two_level_bootstrap`): each resample draws the seeds of A and of B (each row's
  own seeds, with replacement: two rows' seeds are independent trainings), then the test rows (with
  replacement, the same rows for A and B: the rows are paired). The statistic is the mean over the drawn rows
  of (mean correctness of A's drawn seeds - B's). Interval: the percentiles; p: two-sided, from the share of
  resamples on each side of 0, `(k + 1) / (B + 1)` per side, so it is never 0: the smallest p it can give
  is `2 / (B + 1)`, printed as a bound ("< 2.00e-04").
- **Holm–Bonferroni** (`holm`) within each family: every comparison against the reference of one dataset
  (and one training-set size). Verdicts (`better` / `worse` / `n.s.`) come from the adjusted p only.
- **Reference** (`choose_reference`): the single-encoder row with the highest mean dev accuracy; a tie
  (equal mean dev accuracy) goes to the higher mean dev macro-F1, then to the earlier method of
  `TIE_ORDER`. Every other row tied on dev accuracy is reported, with the verdicts that change when it is
  the reference instead.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLES = 10_000
LEVEL = 0.95
ALPHA = 0.05
CHUNK = 1_000


def two_level_bootstrap(
    correct_a,
    correct_b,
    samples: int = SAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    chunk: int = CHUNK,
) -> dict:
    """`diff` (mean accuracy of A minus B), `lo`/`hi` (percentile interval), `p` (two-sided) and
    `p_bound` (True when no resample fell on the far side of 0: p is then the bound `2 / (B + 1)`).

    `correct_a` `[seeds_a, rows]`, `correct_b` `[seeds_b, rows]`: 0/1 correctness, the same test rows in the
    same order. Draw order per chunk of resamples: A's seeds `[c, seeds_a]`, B's seeds `[c, seeds_b]`, rows
    `[c, rows]`, all from `numpy.random.default_rng(seed)`."""
    a = np.atleast_2d(np.asarray(correct_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(correct_b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"A and B cover different numbers of rows: {a.shape[1]} vs {b.shape[1]}")
    (sa, n), sb = a.shape, b.shape[0]
    rng = np.random.default_rng(seed)
    stats = np.empty(samples)
    for start in range(0, samples, chunk):
        c = min(chunk, samples - start)
        ia = rng.integers(0, sa, size=(c, sa))
        ib = rng.integers(0, sb, size=(c, sb))
        rows = rng.integers(0, n, size=(c, n), dtype=np.int32)
        per_row = _seed_weights(ia, sa) @ a - _seed_weights(ib, sb) @ b  # [c, n]
        stats[start : start + c] = np.take_along_axis(per_row, rows, axis=1).mean(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    below, above = int((stats <= 0).sum()), int((stats >= 0).sum())
    k = min(below, above)
    return {
        "diff": float(a.mean() - b.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "p": min(1.0, 2 * (k + 1) / (samples + 1)),
        "p_bound": k == 0,
    }


def _seed_weights(draws: np.ndarray, seeds: int) -> np.ndarray:
    """`[c, seeds]` weights: how often each seed was drawn, divided by the draws per resample."""
    w = np.zeros((len(draws), seeds))
    np.add.at(w, (np.arange(len(draws))[:, None], draws), 1.0)
    return w / draws.shape[1]


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def holm_bounds(pvalues: list[float], bounds: list[bool]) -> list[bool]:
    """Per adjusted p of `holm`: True when it is an upper bound (the raw p that sets it is a bound)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running, bound = [False] * m, -1.0, False
    for rank, i in enumerate(order):
        value = min(1.0, (m - rank) * pvalues[i])
        if value > running:
            running, bound = value, bounds[i] and value < 1.0
        out[i] = bound
    return out


def verdict(diff: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """`better` / `worse` when the adjusted p is below `alpha`, else `n.s.`."""
    if p_adjusted >= alpha:
        return "n.s."
    return "better" if diff > 0 else "worse"


def format_p(p: float, bound: bool = False) -> str:
    """3 significant digits; a bound as "< x" (never "0")."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    return f"< {p:.3g}" if bound else f"{p:.3g}"


def macro_f1(pred, gold, classes: int | None = None) -> float:
    """Macro-averaged F1 over the classes present in `gold` or `pred` (0 for a class never predicted right)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    labels = np.union1d(pred, gold) if classes is None else np.arange(classes)
    scores = []
    for c in labels:
        tp = np.sum((pred == c) & (gold == c))
        denom = np.sum(pred == c) + np.sum(gold == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


TIE_ORDER = (
    "linear_probe",
    "last_layer",
    "best_layer",
    "single_last",
    "single_best",
    "selected",
)


def choose_reference(rows: list[dict]) -> tuple[dict | None, list[dict]]:
    """(the reference row, the other rows tied with it on dev accuracy) among single-encoder rows.

    Each row needs `encoders`, `method`, `val_acc_mean` and `val_f1_mean`. Rule: highest mean dev accuracy;
    ties by higher mean dev macro-F1, then by `TIE_ORDER` (unlisted methods last), then encoder name."""
    single = [r for r in rows if "+" not in r["encoders"]]
    if not single:
        return None, []

    def rank(r: dict):
        order = TIE_ORDER.index(r["method"]) if r["method"] in TIE_ORDER else len(TIE_ORDER)
        return (-r["val_acc_mean"], -r["val_f1_mean"], order, r["encoders"])

    best = min(single, key=rank)
    tied = [r for r in single if r is not best and r["val_acc_mean"] == best["val_acc_mean"]]
    return best, tied
