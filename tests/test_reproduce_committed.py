"""The committed table's statistics are what the committed per-row predictions give.

Every accuracy, interval, p-value and verdict of `results/paper_table.csv` is recomputed from
`results/predictions/*.npz` alone (`layerfusion analyze --from-results results`)."""

from __future__ import annotations

import csv

from conftest import REPO

from layerfusion.reproduce import evidence, from_results


def test_committed_table_recomputes_from_the_committed_predictions():
    rows, problems = from_results(REPO / "results")
    assert problems == []
    written = list(csv.DictReader((REPO / "results" / "paper_table.csv").open()))
    assert len(rows) == len(written)


def test_committed_predictions_cover_every_run_of_the_table():
    runs = list(csv.DictReader((REPO / "results" / "paper_runs.csv").open()))
    for name in dict.fromkeys(r["dataset"] for r in runs):
        packed = evidence.load(REPO / "results" / "predictions" / f"{name}.npz")
        mine = [r for r in runs if r["dataset"] == name]
        assert [
            (str(m["train_rows"]), m["method"], m["encoders"], str(m["seed"]))
            for m in packed["runs"]
        ] == [(r["train_rows"], r["method"], r["encoders"], r["seed"]) for r in mine]
        # each run's test accuracy in paper_runs.csv is the one its committed predictions give
        acc = (packed["pred_test"] == packed["gold_test"]).mean(1)
        for a, r in zip(acc, mine):
            assert abs(a - float(r["test_acc"])) < 1e-6, (name, r["method"], r["seed"])
