"""`layerfusion reproduce` end to end on real MiniLM and a real SST-2 slice (in-process, two seeds).

The two "encoders" are the same real all-MiniLM-L6-v2 under two poolings (mean and CLS), which makes
them genuinely different feature sets while CI only needs the one small model.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from layerfusion.errors import ConfigError
from layerfusion.reproduce import COLUMNS, ROWS, main


def _config(tmp: Path, shared_data: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "experiments" / "sst2.yaml").read_text())
    cfg["trainer"]["max_epochs"] = 2
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("LayerImportance"):
            cb["init_args"].update(attention_samples=16, max_iter=30)
    minilm = "sentence-transformers/all-MiniLM-L6-v2"
    cfg["model"]["encoders"] = [
        {"name": minilm, "pooling": "mean", "max_length": 48, "alias": "mean"},
        {"name": minilm, "pooling": "cls", "max_length": 48, "alias": "cls"},
    ]
    cfg["model"]["cache_dir"] = str(tmp / "cache")
    cfg["data"].update(data_dir=str(shared_data), max_train_samples=160, max_eval_samples=64)
    path = tmp / "sst2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, shared_data, minilm_dir):
    tmp = tmp_path_factory.mktemp("reproduce")
    config = _config(tmp, shared_data)
    args = [str(config), "--seeds", "0", "1", "--out", str(tmp / "results")]
    main([*args, "--runs", str(tmp / "runs")])
    return tmp, args


def test_table_has_every_method_with_layers_chosen_on_train_dev(reproduced):
    tmp, _ = reproduced
    table = _csv(tmp / "results" / "paper_table.csv")
    assert list(table[0]) == COLUMNS
    expected = [
        (r.method, e)
        for r in ROWS
        for e in (["mean", "cls"] if r.encoders == "*" else ["mean+cls"])
    ]
    assert [(r["method"], r["encoders"]) for r in table] == expected
    importance = json.loads((tmp / "results" / "paper_importance" / "sst2.json").read_text())
    rows = importance["rows"]
    best = {
        e: max((r for r in rows if r["encoder"] == e), key=lambda r: (r["probe_acc"], r["layer"]))[
            "layer"
        ]
        for e in ("mean", "cls")
    }
    top = importance["selection"]
    by = {(r["method"], r["encoders"]): r for r in table}
    assert by["last_layer", "mean"]["layers"] == "mean:6"
    assert by["best_layer", "cls"]["layers"] == f"cls:{best['cls']}"
    assert by["selected", "mean"]["layers"] == "mean:" + ",".join(map(str, top["mean"]))
    assert by["gated", "mean+cls"]["layers"] == " ".join(
        f"{e}:{','.join(map(str, top[e]))}" for e in ("mean", "cls")
    )
    assert by["gated_all_layers", "mean+cls"]["layers"] == "mean:0,1,2,3,4,5,6 cls:0,1,2,3,4,5,6"
    for r in table:
        assert r["seeds"] == "2"
        assert 0.3 < float(r["test_acc_mean"]) <= 1.0
        for col in ("extract_s", "train_s", "peak_mem_mb"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (r["method"], col)
    # two encoders cost what the two single-encoder extractions cost
    assert float(by["gated", "mean+cls"]["extract_s"]) == pytest.approx(
        float(by["last_layer", "mean"]["extract_s"]) + float(by["last_layer", "cls"]["extract_s"]),
        rel=1e-6,
    )
    md = (tmp / "results" / "paper_table.md").read_text()
    assert "## sst2" in md and "Target 1, gated >= every single-encoder row" in md


def test_figures_come_from_the_runs(reproduced):
    """Every aggregated mean is the mean of its seeds, and each seed's accuracy is the one its own
    Lightning test run logged."""
    tmp, _ = reproduced
    runs = _csv(tmp / "results" / "paper_runs.csv")
    table = _csv(tmp / "results" / "paper_table.csv")
    assert len(runs) == 2 * len(table)
    for row in table:
        seeds = [
            r for r in runs if (r["method"], r["encoders"]) == (row["method"], row["encoders"])
        ]
        mean = sum(float(r["test_acc"]) for r in seeds) / len(seeds)
        assert float(row["test_acc_mean"]) == pytest.approx(mean, abs=1e-6)
    run = next(r for r in runs if r["method"] == "gated" and r["seed"] == "1")
    logged = _csv(tmp / "runs" / "sst2" / "gated" / "seed1" / "metrics.csv")
    test_acc = [float(r["test_acc"]) for r in logged if r.get("test_acc")]
    assert test_acc == [pytest.approx(float(run["test_acc"]), abs=1e-6)]


def test_rerun_reuses_finished_runs_and_redoes_damaged_ones(reproduced):
    tmp, args = reproduced
    results = sorted((tmp / "runs").rglob("result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    before = (tmp / "results" / "paper_table.csv").read_text()
    damaged = tmp / "runs" / "sst2" / "concat_last" / "seed0" / "result.json"
    damaged.write_text("{not json")
    main([*args, "--runs", str(tmp / "runs"), "--methods", "concat_last", "gated"])
    changed = [p for p in results if p.stat().st_mtime_ns != stamps[p]]
    assert changed == [damaged]
    assert json.loads(damaged.read_text())["method"] == "concat_last"
    table = _csv(tmp / "results" / "paper_table.csv")
    assert [r["method"] for r in table] == ["concat_last", "gated"]
    old = {(r["method"], r["encoders"]): r for r in csv.DictReader(before.splitlines())}
    for r in table:  # same settings and seed: the rebuilt run reproduces the number
        assert r["test_acc_mean"] == old[r["method"], r["encoders"]]["test_acc_mean"]


def test_bad_arguments_are_named(reproduced, tmp_path):
    _, args = reproduced  # a valid (small) config first: the missing one is reported before any run
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        main(
            [args[0], str(tmp_path / "nope.yaml"), "--out", str(tmp_path), "--runs", str(tmp_path)]
        )
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written
    with pytest.raises(ConfigError, match=r"unknown methods \['nope'\]"):
        main([str(tmp_path / "x.yaml"), "--methods", "nope"])


def test_runs_can_be_tracked_in_wandb(reproduced, monkeypatch):
    """`--logger wandb`: each run is its own offline W&B run (grouped by dataset) with its test figures."""
    from wandb_records import read_run

    tmp, args = reproduced
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs = tmp / "wandb_runs"
    main(
        [args[0], "--seeds", "0", "1", "--methods", "gated", "--logger", "wandb"]
        + ["--out", str(tmp / "wandb_results"), "--runs", str(runs)]
    )
    for seed in (0, 1):
        run_dir = runs / "sst2" / "gated" / f"seed{seed}"
        result = json.loads((run_dir / "result.json").read_text())
        offline = sorted((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline
        record = read_run(offline[0])
        assert record["history"]["test_acc"] == [pytest.approx(result["test_acc"], abs=1e-6)]
        assert "val_acc" in record["history"]
        assert record["config"]["head"] == "gated"
