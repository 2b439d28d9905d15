"""The table's statistics (`layerfusion.reproduce.stats`, `.evidence`, `.stacking`) against exact expected
values on small synthetic per-row predictions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from layerfusion.reproduce import evidence, stats
from layerfusion.reproduce.stacking import stack, stratified_folds


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([0.2]) == [0.2]
    # the bound follows the raw p that sets the adjusted value
    assert stats.holm_bounds([0.001, 0.04, 0.001], [True, False, True]) == [True, False, True]
    assert stats.holm_bounds([0.001, 0.0015], [True, False]) == [True, True]  # 0.003 > 0.0015
    assert stats.holm_bounds([0.001, 0.3], [True, False]) == [True, False]


def test_two_level_bootstrap_equals_a_direct_computation_with_the_same_generator():
    rng = np.random.default_rng(7)
    a = rng.random((4, 30)) < 0.8
    b = rng.random((3, 30)) < 0.7
    got = stats.two_level_bootstrap(a, b, samples=50, seed=3, chunk=20)
    gen = np.random.default_rng(3)
    draws = []
    for c in (20, 20, 10):
        ia, ib = gen.integers(0, 4, (c, 4)), gen.integers(0, 3, (c, 3))
        rows = gen.integers(0, 30, (c, 30), dtype=np.int32)
        for k in range(c):
            total = 0.0
            for r in rows[k]:
                total += sum(a[s, r] for s in ia[k]) / 4 - sum(b[s, r] for s in ib[k]) / 3
            draws.append(total / 30)
    draws = np.array(draws)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    k = min((draws <= 0).sum(), (draws >= 0).sum())
    assert got["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert got["lo"] == pytest.approx(lo, abs=1e-12) and got["hi"] == pytest.approx(hi, abs=1e-12)
    assert got["p"] == pytest.approx(min(1.0, 2 * (k + 1) / 51), abs=1e-12)
    assert got["p_bound"] == (k == 0)


def test_p_is_never_zero_and_prints_as_a_bound():
    a, b = np.ones((3, 40), bool), np.zeros((3, 40), bool)
    got = stats.two_level_bootstrap(a, b, samples=999)
    assert got["p"] == pytest.approx(2 / 1000) and got["p_bound"]
    assert stats.format_p(got["p"], got["p_bound"]) == "< 0.002"
    assert stats.format_p(0.0123456) == "0.0123"
    same = stats.two_level_bootstrap(a, a, samples=99)
    assert same["p"] == 1.0 and not same["p_bound"] and same["lo"] == same["hi"] == 0.0


def test_seed_variance_widens_the_interval():
    """Two rows that differ only between seeds: the row-only bootstrap of seed-averaged rows is narrower."""
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.8
    a = np.stack([base ^ (rng.random(400) < 0.15 * (k % 2)) for k in range(10)])
    got = stats.two_level_bootstrap(a, base[None], samples=2000)
    rows_only = stats.two_level_bootstrap(a.mean(0, keepdims=True), base[None], samples=2000)
    assert got["hi"] - got["lo"] > rows_only["hi"] - rows_only["lo"]


def test_verdict_only_after_correction():
    assert stats.verdict(0.01, 0.049) == "better" and stats.verdict(-0.01, 0.01) == "worse"
    assert stats.verdict(0.03, 0.05) == "n.s."


def test_reference_tie_rule_and_tied_rows():
    rows = [
        {"method": "selected", "encoders": "b", "val_acc_mean": 0.9, "val_f1_mean": 0.8},
        {"method": "linear_probe", "encoders": "b", "val_acc_mean": 0.9, "val_f1_mean": 0.8},
        {"method": "last_layer", "encoders": "a", "val_acc_mean": 0.9, "val_f1_mean": 0.85},
        {"method": "gated", "encoders": "a+b", "val_acc_mean": 0.95, "val_f1_mean": 0.9},
    ]
    ref, tied = stats.choose_reference(rows)
    assert ref is rows[2]  # equal dev accuracy: the higher dev macro-F1
    assert tied == [rows[0], rows[1]]
    rows[2]["val_f1_mean"] = 0.8
    ref, _ = stats.choose_reference(list(reversed(rows)))
    assert ref is rows[1]  # then the simpler method, whatever the table order


def test_macro_f1_against_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    gold, pred = rng.integers(0, 5, 200), rng.integers(0, 4, 200)
    assert stats.macro_f1(pred, gold) == pytest.approx(f1_score(gold, pred, average="macro"))


def _runs(tmp_path, spec: dict[tuple, list[np.ndarray]], gold: dict[str, np.ndarray]) -> list[dict]:
    """Run directories with predictions files, as `reproduce` writes them."""
    from layerfusion.analysis import write_predictions

    out = []
    for (n, method, encoders), preds in spec.items():
        for seed, pred in enumerate(preds):
            d = tmp_path / "runs" / f"{n}-{method}-{encoders}" / f"seed{seed}"
            for s in ("val", "test"):
                write_predictions(d / f"predictions_{s}.csv", range(len(gold[s])), pred[s], gold[s])
            out.append(
                {
                    "train_rows": n,
                    "method": method,
                    "encoders": encoders,
                    "layers": "x:1",
                    "seed": seed,
                    "run_dir": str(d),
                }
            )
    return out


def _flip(gold: np.ndarray, share: float, rng) -> np.ndarray:
    return np.where(rng.random(len(gold)) < share, 1 - gold, gold)


def test_tie_is_flagged_with_the_verdicts_that_change(tmp_path):
    """Two single-encoder rows tie on dev; gated is better than one and no different from the other."""
    rng = np.random.default_rng(0)
    gold = {"val": rng.integers(0, 2, 100), "test": rng.integers(0, 2, 300)}
    val = _flip(gold["val"], 0.1, rng)
    weak = _flip(gold["test"], 0.4, rng)
    spec = {
        ("", "linear_probe", "a"): [{"val": val, "test": weak}] * 3,
        ("", "selected", "a"): [
            {"val": val, "test": _flip(gold["test"], 0.05, rng)} for _ in range(3)
        ],
        ("", "gated", "a+b"): [
            {"val": val, "test": _flip(gold["test"], 0.05, rng)} for _ in range(3)
        ],
    }
    packed = evidence.pack(_runs(tmp_path, spec, gold))
    rows = evidence.evidence_table("toy", packed, samples=500)
    probe, selected, gated = rows
    assert probe["verdict"] == "reference"  # the tie rule: linear_probe before selected
    assert probe["ref_tied"] == "selected a"
    assert gated["primary"] and gated["verdict"] == "better"
    assert probe["tie_changes"] == "gated a+b: better -> n.s."
    # Holm over the family's two comparisons
    assert gated["p_holm"] == pytest.approx(min(1.0, 2 * min(gated["p"], selected["p"])))


def test_committed_form_recomputes_exactly_and_a_changed_cell_is_reported(tmp_path):
    from layerfusion.reproduce import COLUMNS, csv_rows, from_results

    rng = np.random.default_rng(2)
    gold = {"val": rng.integers(0, 3, 60), "test": rng.integers(0, 3, 90)}
    spec = {
        (n, m, e): [{s: _flip(gold[s] % 2, share, rng) for s in ("val", "test")} for _ in range(3)]
        for n in ("", 50)
        for m, e, share in (("selected", "a", 0.2), ("selected", "b", 0.3), ("gated", "a+b", 0.15))
    }
    packed = evidence.pack(_runs(tmp_path, spec, gold))
    out = tmp_path / "results"
    evidence.save(out / "predictions" / "toy.npz", packed)
    loaded = evidence.load(out / "predictions" / "toy.npz")
    assert loaded["runs"] == packed["runs"]
    assert (loaded["pred_test"] == packed["pred_test"]).all()
    table = evidence.evidence_table("toy", packed, samples=300)
    with open(out / "paper_table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(csv_rows(table, COLUMNS))
    rows, problems = from_results(out, samples=300)
    assert problems == [] and len(rows) == 6
    assert {r["train_rows"] for r in rows} == {"", 50}
    lines = (out / "paper_table.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",better,", ",n.s.,").replace(",worse,", ",n.s.,")
    lines[1] = lines[1].replace(",reference,", ",better,")
    (out / "paper_table.csv").write_text("\n".join(lines) + "\n")
    _, problems = from_results(out, samples=300)
    assert any("verdict" in p for p in problems), problems
    json.dumps(problems)


def test_stacking_folds_and_fit():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    fold = stratified_folds(labels, 5, seed=0)
    for c in (0, 1, 2):  # each class spread over the folds as evenly as possible
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    rng = np.random.default_rng(0)
    gold_val, gold_test = rng.integers(0, 2, 200), rng.integers(0, 2, 100)

    def logp(gold, noise):
        x = np.eye(2)[gold] * 3 + rng.normal(0, noise, (len(gold), 2))
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    good = (logp(gold_val, 1.0), logp(gold_test, 1.0))
    useless = (rng.normal(size=(200, 2)), rng.normal(size=(100, 2)))
    pred = stack([good[0], useless[0]], gold_val, [good[1], useless[1]])
    alone = good[1].argmax(1)
    assert (pred["test"] == gold_test).mean() >= (alone == gold_test).mean() - 0.03
    assert pred["val"].shape == gold_val.shape


def test_verdicts_come_from_holm_adjusted_p(tmp_path, monkeypatch):
    """Three rows each at raw p 0.02 against the reference: Holm gives 0.06, so no verdict is `better`."""
    rng = np.random.default_rng(3)
    gold = {"val": rng.integers(0, 2, 50), "test": rng.integers(0, 2, 80)}
    good = {s: gold[s].copy() for s in ("val", "test")}
    spec = {
        ("", "selected", "a"): [good] * 2,
        ("", "selected", "b"): [{"val": 1 - gold["val"], "test": gold["test"]}] * 2,
        ("", "fused_last", "a+b"): [good] * 2,
        ("", "gated", "a+b"): [good] * 2,
    }
    packed = evidence.pack(_runs(tmp_path, spec, gold))
    fixed = {"diff": 0.01, "lo": -0.001, "hi": 0.02, "p": 0.02, "p_bound": False}
    monkeypatch.setattr(stats, "two_level_bootstrap", lambda *a, **k: dict(fixed))
    rows = evidence.evidence_table("toy", packed)
    assert [r["verdict"] for r in rows] == ["reference", "n.s.", "n.s.", "n.s."]
    assert [r["p_holm"] for r in rows[1:]] == pytest.approx([0.06, 0.06, 0.06])
    fixed["p"] = 0.01  # 0.03 after Holm
    rows = evidence.evidence_table("toy", packed)
    assert [r["verdict"] for r in rows[1:]] == ["better"] * 3
