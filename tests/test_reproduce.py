"""`layerfusion reproduce` end to end on real MiniLM and a real SST-2 slice (in-process, two seeds).

The two "encoders" are the same real all-MiniLM-L6-v2 under two poolings (mean and CLS), which makes
them genuinely different feature sets while CI only needs the one small model.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from layerfusion import analysis
from layerfusion.errors import ConfigError
from layerfusion.reproduce import (
    COLUMNS,
    FACTORIAL,
    L2_GRID,
    ROWS,
    evidence,
    from_results,
    main,
)

# the runs here are small ops (heads on 128 rows, full-batch L-BFGS probes): the two linear_probe rows
# took 101 s with two threads, 7.5 s with one, side by side at load ~8
pytestmark = pytest.mark.usefixtures("one_thread")

EVAL_ROWS = 48
"""Dev and test rows of the SST-2 slice (train: 128, two batches of the config's 64)."""


def _config(tmp: Path, shared_data: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "experiments" / "sst2.yaml").read_text())
    cfg["trainer"]["max_epochs"] = 1  # the best checkpoint is still restored for validate and test
    # 128 rows = 2 steps an epoch: no "smaller than the logging interval" warning; the low-data arm's
    # 40 rows (1 step) would trip it unless reproduce lowers the interval for the arm
    cfg["trainer"]["log_every_n_steps"] = 2
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("LayerImportance"):
            cb["init_args"].update(attention_samples=16, max_iter=30)
    minilm = "sentence-transformers/all-MiniLM-L6-v2"
    cfg["model"]["encoders"] = [
        {"name": minilm, "pooling": "mean", "max_length": 32, "alias": "mean"},
        {"name": minilm, "pooling": "cls", "max_length": 32, "alias": "cls"},
    ]
    cfg["model"]["cache_dir"] = str(tmp / "cache")
    cfg["data"].update(data_dir=str(shared_data), max_train_samples=128, max_eval_samples=EVAL_ROWS)
    path = tmp / "sst2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, shared_data, minilm_dir):
    tmp = tmp_path_factory.mktemp("reproduce")
    config = _config(tmp, shared_data)
    args = [str(config), "--seeds", "0", "1", "--out", str(tmp / "results"), "--train-rows", "40"]
    console = _Records()
    watched = [
        logging.getLogger(n) for n in ("layerfusion", "lightning.pytorch", "lightning.fabric")
    ]
    for lg in watched:
        lg.addHandler(console)
    # `main` shows layerfusion's INFO lines on stderr (`log_to_stderr`) only when the logger has no
    # handler yet; with this recording handler on it, set the level it would set
    watched[0].setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main([*args, "--runs", str(tmp / "runs")])
    finally:
        for lg in watched:
            lg.removeHandler(console)
    # the low-data arm's one-step epochs must not trip Lightning's logging-interval warning
    assert not [w for w in caught if "logging interval" in str(w.message)]
    (tmp / "console.log").write_text("\n".join(console.messages))
    return tmp, args


class _Records(logging.Handler):
    """Every message that reaches a handler (what the console shows)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_console_has_one_line_per_head_run_not_lightnings_per_run_chatter(reproduced):
    tmp, _ = reproduced
    lines = (tmp / "console.log").read_text().splitlines()
    trained = [r for r in _csv(tmp / "results" / "paper_runs.csv") if r["method"] != "stacking"]
    finished = [ln for ln in lines if re.search(r"/seed\d+: test_acc [\d.]+, val_acc", ln)]
    assert sorted(ln.split(":")[0] for ln in finished) == sorted(r["run_dir"] for r in trained)
    # each head run validates and tests its best checkpoint: 4 restore lines a run without the filter
    assert not [ln for ln in lines if "Restoring states from the checkpoint" in ln]
    assert not [ln for ln in lines if "Loaded model weights from the checkpoint" in ln]
    # extraction and importance run before the head runs, outside the filter: their lines still show
    assert [ln for ln in lines if "layer selection (top_k)" in ln]


def test_table_has_every_method_with_layers_chosen_on_train_dev(reproduced):
    tmp, _ = reproduced
    table = _csv(tmp / "results" / "paper_table.csv")
    assert list(table[0]) == COLUMNS
    expected = [
        (n, r.method, e)
        for n, rows in (("", ROWS), ("40", [r for r in ROWS if r.method in FACTORIAL]))
        for r in rows
        for e in (["mean", "cls"] if r.encoders == "*" else ["mean+cls"])
    ]
    assert [(r["train_rows"], r["method"], r["encoders"]) for r in table] == expected
    importance = json.loads((tmp / "results" / "paper_importance" / "sst2.json").read_text())
    rows = importance["rows"]
    best = {
        e: max((r for r in rows if r["encoder"] == e), key=lambda r: (r["probe_acc"], r["layer"]))[
            "layer"
        ]
        for e in ("mean", "cls")
    }
    top = importance["selection"]
    by = {(r["method"], r["encoders"]): r for r in table if not r["train_rows"]}
    assert by["last_layer", "mean"]["layers"] == "mean:6"
    assert by["best_layer", "cls"]["layers"] == f"cls:{best['cls']}"
    assert by["selected", "mean"]["layers"] == "mean:" + ",".join(map(str, top["mean"]))
    assert by["gated", "mean+cls"]["layers"] == " ".join(
        f"{e}:{','.join(map(str, top[e]))}" for e in ("mean", "cls")
    )
    assert by["gated_all_layers", "mean+cls"]["layers"] == "mean:0,1,2,3,4,5,6 cls:0,1,2,3,4,5,6"
    assert by["fused_best", "mean+cls"]["layers"] == f"mean:{best['mean']} cls:{best['cls']}"
    assert by["single_last", "cls"]["layers"] == "cls:6"
    for r in table:
        assert r["seeds"] == ("1" if r["method"] == "stacking" else "2")
        if r["method"] in ("gated", "fused_last", "fused_best") and r["train_rows"] == "":
            weights = [float(x.rsplit(":", 1)[1]) for x in r["gate"].split()]
            assert len(weights) == 2 and sum(weights) == pytest.approx(1.0, abs=1e-3)
        if r["method"] == "stacking":
            continue
        for col in ("extract_s", "extract_peak_mb", "train_s", "train_peak_mb"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (r["method"], col)
    # a linear_probe run is convex and full-batch: both seeds give the same predictions
    probe = [tmp / "runs" / "sst2" / "linear_probe-mean" / f"seed{k}" for k in (0, 1)]
    a, b = (analysis.read_predictions(d / "predictions_test.csv") for d in probe)
    assert (a["pred"] == b["pred"]).all()
    assert json.loads((probe[0] / "result.json").read_text())["l2"] in L2_GRID
    # two encoders cost what the two single-encoder extractions cost
    assert float(by["gated", "mean+cls"]["extract_s"]) == pytest.approx(
        float(by["last_layer", "mean"]["extract_s"]) + float(by["last_layer", "cls"]["extract_s"]),
        rel=1e-6,
    )


def test_figures_come_from_the_runs(reproduced):
    """Every aggregated mean is the mean of its seeds, and each seed's accuracy is the one its own
    Lightning test run logged."""
    tmp, _ = reproduced
    runs = _csv(tmp / "results" / "paper_runs.csv")
    table = _csv(tmp / "results" / "paper_table.csv")
    assert len(runs) == 2 * len(table) - 1  # stacking: one deterministic fit
    for row in table:
        seeds = [
            r
            for r in runs
            if (r["train_rows"], r["method"], r["encoders"])
            == (row["train_rows"], row["method"], row["encoders"])
        ]
        mean = sum(float(r["test_acc"]) for r in seeds) / len(seeds)
        assert float(row["test_acc_mean"]) == pytest.approx(mean, abs=1e-6)
    run = next(
        r for r in runs if r["method"] == "gated" and r["seed"] == "1" and not r["train_rows"]
    )
    logged = _csv(tmp / "runs" / "sst2" / "gated" / "seed1" / "metrics.csv")
    test_acc = [float(r["test_acc"]) for r in logged if r.get("test_acc")]
    assert test_acc == [pytest.approx(float(run["test_acc"]), abs=1e-6)]
    # each run's saved predictions give exactly its test and (best checkpoint's) dev accuracy
    for r in runs:
        for split, col in (("test", "test_acc"), ("val", "val_acc"))[
            : 1 if r["method"] == "stacking" else 2
        ]:
            p = analysis.read_predictions(Path(r["run_dir"]) / f"predictions_{split}.csv")
            assert (p["pred"] == p["gold"]).mean() == pytest.approx(float(r[col]), abs=1e-6)
            assert list(p["index"]) == list(range(EVAL_ROWS))


def test_statistics_recompute_from_the_packed_predictions(reproduced, tmp_path):
    """The packed file holds every run's predictions; `analyze --from-results` recomputes the table."""
    from layerfusion.analysis import main as analyze_main

    tmp, _ = reproduced
    out = tmp / "results"
    packed = evidence.load(out / "predictions" / "sst2.npz")
    runs = _csv(out / "paper_runs.csv")
    assert len(packed["runs"]) == len(runs)
    for meta, pred in zip(packed["runs"], packed["pred_test"]):
        run = next(
            r
            for r in runs
            if (r["train_rows"], r["method"], r["encoders"], r["seed"])
            == (str(meta["train_rows"]), meta["method"], meta["encoders"], str(meta["seed"]))
        )
        saved = analysis.read_predictions(Path(run["run_dir"]) / "predictions_test.csv")
        assert (pred == saved["pred"]).all()
    _, problems = from_results(out)
    assert problems == []
    assert analyze_main(["--from-results", str(out), "--out", str(tmp_path)]) == 0
    table = _csv(out / "paper_table.csv")
    for n in ("", "40"):
        family = [r for r in table if r["train_rows"] == n]
        assert sum(r["verdict"] == "reference" for r in family) == 1
        (primary,) = [r for r in family if r["primary"] == "True"]
        assert (primary["method"], primary["encoders"]) == ("gated", "mean+cls")
    md = (out / "paper_table.md").read_text()
    assert "## Primary comparison: gated (both encoders) vs the reference" in md
    assert "--share 0.5" in md and "--train-rows 40" in md
    assert "## Stacking bound (full data)" in md and "| sst2 | 40 | " in md


def test_complementarity_and_analyze_agree_with_the_predictions(reproduced, tmp_path):
    tmp, _ = reproduced
    pairs = _csv(tmp / "results" / "paper_complementarity.csv")
    assert {(p["split"], p["seed"]) for p in pairs} == {
        (s, k) for s in ("val", "test") for k in "01"
    }
    cka = _csv(tmp / "results" / "paper_cka" / "sst2.csv")
    assert len(cka) == 14 * 14 and (tmp / "results" / "paper_cka" / "sst2.png").stat().st_size > 0
    same = {(r["a"], r["b"]): float(r["cka"] or "nan") for r in cka}
    assert same["mean:3", "mean:3"] == pytest.approx(1.0) and same["mean:3", "cls:3"] < 1.0
    assert math.isnan(
        same["cls:0", "cls:0"]
    )  # the CLS token before any layer: the same for every row
    p = next(p for p in pairs if (p["split"], p["seed"]) == ("test", "0"))
    run_a = tmp / "runs" / "sst2" / f"{p['row_a']}-{p['encoder_a']}" / "seed0"
    run_b = tmp / "runs" / "sst2" / f"{p['row_b']}-{p['encoder_b']}" / "seed0"
    a, b = (analysis.read_predictions(d / "predictions_test.csv") for d in (run_a, run_b))
    ra, rb = a["pred"] == a["gold"], b["pred"] == b["gold"]
    assert int(p["both_right"]) == int((ra & rb).sum())
    assert int(p["only_a"]) == int((ra & ~rb).sum()) and int(p["only_b"]) == int((~ra & rb).sum())
    assert float(p["oracle_acc"]) == pytest.approx((ra | rb).mean())
    # `layerfusion analyze` on the same two run directories gives the same counts
    files = analysis.analyze([run_a, run_b], tmp_path)
    assert {f.name for f in files} == {"agreement.csv", "cka.csv", "cka.png"}
    row = next(r for r in _csv(tmp_path / "agreement.csv") if r["split"] == "test")
    assert (row["both_right"], row["only_a"], row["only_b"]) == (
        p["both_right"],
        p["only_a"],
        p["only_b"],
    )
    with pytest.raises(ConfigError, match="predictions_test.csv does not exist"):
        analysis.analyze([run_a, tmp_path], tmp_path / "x")


def test_rerun_reuses_finished_runs_and_redoes_damaged_ones(reproduced):
    tmp, args = reproduced
    results = sorted((tmp / "runs").rglob("result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    before = (tmp / "results" / "paper_table.csv").read_text()
    damaged = tmp / "runs" / "sst2" / "concat_last" / "seed0" / "result.json"
    damaged.write_text("{not json")
    legacy = tmp / "runs" / "sst2" / "gated" / "seed1" / "result.json"
    old_result = json.loads(legacy.read_text())
    legacy.write_text(json.dumps({**old_result, "extract_s": 12.5}))  # a key older versions wrote
    stamps[legacy] = legacy.stat().st_mtime_ns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*args[:-2], "--runs", str(tmp / "runs"), "--methods", "concat_last", "gated"])
    # the redone run starts from an empty directory: no "exists and is not empty" from Lightning's
    # CSV logger and ModelCheckpoint about the damaged run's files
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    changed = [p for p in results if p.stat().st_mtime_ns != stamps[p]]
    assert changed == [damaged]  # and the legacy result was reused, not retrained
    assert json.loads(damaged.read_text())["method"] == "concat_last"
    table = _csv(tmp / "results" / "paper_table.csv")
    assert [r["method"] for r in table] == ["concat_last", "gated"]
    old = {
        (r["method"], r["encoders"]): r
        for r in csv.DictReader(before.splitlines())
        if not r["train_rows"]
    }
    for r in table:  # same settings and seed: the rebuilt run reproduces the number
        assert r["test_acc_mean"] == old[r["method"], r["encoders"]]["test_acc_mean"]
    runs = _csv(tmp / "results" / "paper_runs.csv")  # columns: the union over the runs
    assert [r["extract_s"] for r in runs if r["method"] == "gated"] == ["", "12.5"]
    # one seed: no "± 0.00"; the W&B logger is not part of the reuse key
    main(
        [*args[:1], "--seeds", "0", "--methods", "gated", "--logger", "wandb"]
        + [*args[-4:-2], "--runs", str(tmp / "runs")]
    )
    assert [p for p in results if p.stat().st_mtime_ns != stamps[p]] == [damaged]
    md = (tmp / "results" / "paper_table.md").read_text()
    (gated,) = [line for line in md.splitlines() if line.startswith("| gated | mean+cls")]
    assert "±" not in gated and "--methods gated --logger wandb" in md
    assert _csv(tmp / "results" / "paper_table.csv")[0]["test_acc_std"] == ""


def test_reuse_only_tabulates_finished_rows_and_trains_nothing(reproduced, tmp_path):
    tmp, args = reproduced
    runs = tmp / "runs"
    missing = runs / "sst2" / "fused_last" / "seed1" / "result.json"
    kept = missing.read_text()
    missing.unlink()
    try:
        before = {p: p.stat().st_mtime_ns for p in runs.rglob("result.json")}
        out = tmp_path / "results"
        main(
            [args[0], "--seeds", "0", "1", "--out", str(out), "--runs", str(runs), "--reuse-only"]
            + ["--methods", "selected", "gated", "fused_last"]
        )
        assert {p: p.stat().st_mtime_ns for p in runs.rglob("result.json")} == before
    finally:
        missing.write_text(kept)
    table = _csv(out / "paper_table.csv")
    assert [(r["method"], r["encoders"]) for r in table] == [
        ("selected", "mean"),
        ("selected", "cls"),
        ("gated", "mean+cls"),
    ]
    assert from_results(out)[1] == []


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
    # the dataset's analysis is one more W&B run: significance and CKA tables, the CKA heatmap
    (offline,) = sorted((runs / "sst2" / "analysis" / "wandb").glob("offline-run-*"))
    history = read_run(offline)["history"]
    assert history["runs/_type"] == ["table-file"]
    assert history["runs/nrows"] == [2]  # the one row trained here: gated, two seeds
    assert history["cka/_type"] == ["table-file"] and history["cka/nrows"] == [14 * 14]
    assert history["cka_heatmap/_type"] == ["image-file"]


def test_reuse_key_is_the_resolved_config_without_the_logger():
    """Writing out a default changes nothing, changing a value does, and so does not the logger."""
    from layerfusion.cli import resolved_config_hash as settings_hash

    cfg = yaml.safe_load((REPO / "configs" / "experiments" / "sst2.yaml").read_text())
    base = settings_hash(cfg)
    explicit = {**cfg, "model": {**cfg["model"], "cache_dtype": "float16"}}  # the default
    assert settings_hash(explicit) == base
    other = {**cfg, "model": {**cfg["model"], "cache_dtype": "float32"}}
    assert settings_hash(other) != base
    wandb = {
        **cfg,
        "trainer": {
            **cfg["trainer"],
            "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger"},
        },
    }
    assert settings_hash(wandb) == base
