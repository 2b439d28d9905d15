"""End to end: the real CLI (`python -m layerfusion` processes, and in-process where only files are checked),
real all-MiniLM-L6-v2, a slice of real SST-2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conftest
import pytest
import torch
from conftest import SECRET
from wandb_records import read_run

from layerfusion.__main__ import main
from layerfusion.cli import cli_main

pytestmark = pytest.mark.slow


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI with W&B offline and fake secrets in the environment (which must never be written)."""
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET}
    return conftest.run_cli(*args, cwd=cwd, env=env, check=check)


def _metrics(csv_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(next(csv_dir.rglob("metrics.csv")).open()))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


def test_fit_validate_test_predict(minilm_run, monkeypatch, caplog):
    """The shared `fit` and `test` runs; `validate` (in this process), `predict`, `classify` on them."""
    d = minilm_run.dir
    monkeypatch.chdir(d)
    monkeypatch.setattr(
        sys, "argv", ["layerfusion"]
    )  # the CLI's arguments are `args`, not pytest's
    assert "extracted all-MiniLM-L6-v2/train: 400 rows" in minilm_run.fit.stderr
    best = d / "run" / "checkpoints" / "best.ckpt"
    assert best.is_file() and best.stat().st_size < 5e6
    ckpt = torch.load(best, weights_only=True)
    assert all(k.startswith("head.") for k in ckpt["state_dict"])
    assert ckpt["layerfusion"]["label_names"] == ["negative", "positive"]  # sst2: readable names
    best_val = max(
        v["best_model_score"].item()
        for k, v in ckpt["callbacks"].items()
        if k.startswith("ModelCheckpoint") and "'monitor': 'val_acc'" in k
    )
    assert best_val > 0.7  # MiniLM's layers separate SST-2 well even from 400 examples

    # validate in this process, through a CSV logger instead of the config's W&B one
    logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir"]
    with caplog.at_level("INFO", logger="layerfusion"):
        cli_main(["validate", "--config", "full.yaml", "--ckpt_path", str(best), *logger, "val"])
    assert "feature cache hit" in caplog.text  # the dev features were extracted once, by fit
    assert _metrics(d / "val")["val_acc"] == pytest.approx(best_val, abs=0)

    # the fit and test runs' own W&B logger (offline, from the quickstart config) recorded each run
    records = {}
    for path in sorted((d / "run" / "wandb").glob("offline-run-*")):
        record = read_run(path)
        records["test" if "test_acc" in record["history"] else "fit"] = (path, record)
    assert sorted(records) == ["fit", "test"], records
    test_acc = json.loads((d / "run" / "metrics_test.json").read_text())["test_acc"]
    assert 0.6 < test_acc <= 1.0
    assert records["test"][1]["history"]["test_acc"] == [pytest.approx(test_acc, abs=1e-6)]
    fit_dir, record = records["fit"]
    assert record["history"]["val_acc"][-1] > 0.5 and "val_f1_negative" in record["history"]
    train_acc = record["history"]["train_acc"]  # once per epoch, like val_acc
    assert len(train_acc) == len(record["history"]["val_acc"]) and 0.5 < train_acc[-1] <= 1.0
    assert record["config"]["config"]["model"]["head"] == "gated"  # the full resolved config
    assert "resources/train_s" in record["history"] and "resources/extract_s" in record["history"]
    assert list((fit_dir / "files" / "media" / "images" / "val").glob("confusion_matrix*.png"))
    media = fit_dir / "files" / "media"
    assert list((media / "table").glob("layer_importance*.table.json")), (
        "importance table logged as a W&B Table"
    )
    assert list((media / "images").glob("layer_importance_heatmap*.png")), (
        "importance heatmap logged as an image"
    )
    table = (d / "run" / "importance.csv").read_text().splitlines()
    assert table[0].startswith("encoder,layer,grad_norm,attention_entropy,probe_acc,score,selected")
    assert (
        len(table) == 1 + 7 and sum(",True" in row for row in table) == 3
    )  # 7 MiniLM layers, top 3 kept
    chosen = sorted(int(r.split(",")[1]) for r in table[1:] if r.endswith(",True"))
    assert ckpt["layerfusion"]["selection"]["all-MiniLM-L6-v2"] == chosen
    assert (d / "run" / "importance_heatmap.png").stat().st_size > 1000

    run_cli("predict", "--config", "full.yaml", "--ckpt_path", str(best), cwd=d)
    leaked = [
        p for p in (d / "run").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()
    ]
    assert not leaked, f"API key written to {leaked}"
    rows = [json.loads(line) for line in (d / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 120
    assert set(rows[0]) == {"text", "label", "probs", "gold"}
    assert all(
        abs(sum(r["probs"].values()) - 1) < 1e-4
        and r["label"] == max(r["probs"], key=r["probs"].get)
        for r in rows
    )
    assert sum(r["label"] == r["gold"] for r in rows) / len(rows) == pytest.approx(
        test_acc, abs=1e-6
    )

    # the Python API on the same checkpoint: encoders online, selected layers only, no Trainer
    from layerfusion import Classifier

    mine = Classifier.from_checkpoint(best, device="cpu").predict_dicts([r["text"] for r in rows])
    assert [m["label"] for m in mine] == [r["label"] for r in rows]  # row for row
    for m, r in zip(mine, rows, strict=True):
        assert m["probs"] == pytest.approx(r["probs"], abs=1e-5)
    # and the command line, from a folder written by Classifier.save
    Classifier.from_checkpoint(best, device="cpu").save(d / "saved")
    classify = run_cli("classify", str(d / "saved"), rows[0]["text"], rows[1]["text"], cwd=d)
    out = [json.loads(line) for line in classify.stdout.splitlines()]
    assert [o["label"] for o in out] == [r["label"] for r in rows[:2]]
    assert out[0]["probs"] == pytest.approx(rows[0]["probs"], abs=1e-5)
    assert classify.stderr == "", classify.stderr  # no loading bars, no warnings


def test_without_a_logger_the_run_files_are_still_written_and_reported(
    minilm_config, monkeypatch, capsys
):
    """`fit` (one epoch), `test` (in this process), `report` and `analyze` with `--trainer.logger false`;
    the run directory (run files, checkpoints, per-row predictions) is its own, the feature cache the
    shared one."""
    d = minilm_config
    monkeypatch.chdir(d)
    monkeypatch.setattr(
        sys, "argv", ["layerfusion"]
    )  # the CLI's arguments are `args`, not pytest's
    out = d / "nolog"
    (d / "nolog.yaml").write_text((d / "full.yaml").read_text().replace(str(d / "run"), str(out)))
    no_logger = ["--config", "nolog.yaml", "--trainer.logger", "false"]
    cli_main(["fit", *no_logger, "--trainer.max_epochs", "1"])
    assert not (out / "wandb").exists()
    for name in (
        "run.json",
        "metrics_val.json",
        "metrics_val.csv",
        "confusion_val.png",
        "resources.json",
    ):
        assert (out / name).is_file(), name
    assert "val_f1_positive" in (out / "metrics_val.csv").read_text()  # sst2: named labels
    best = out / "checkpoints" / "best.ckpt"  # ModelCheckpoint's dirpath is set in the config
    cli_main(["test", *no_logger, "--ckpt_path", str(best)])
    assert not (out / "wandb").exists()
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert 0.5 < metrics["test_acc"] <= 1 and 0 < metrics["test_f1"] <= 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["report", str(out), "--out", str(d / "report")])
    assert done.value.code == 0
    assert "results.md" in capsys.readouterr().out
    table = (d / "report" / "results.md").read_text()
    assert "| nolog | sst2 | gated | all-MiniLM-L6-v2 |" in table
    assert f"| {metrics['test_acc']:.4f} | {metrics['test_f1']:.4f} |" in table
    assert (d / "report" / "accuracy.png").stat().st_size > 1000

    # the same run directory is what `analyze` reads: RunReport wrote every row's prediction
    import yaml

    from layerfusion.analysis import read_predictions
    from layerfusion.data.datamodule import TextClassificationDataModule

    dm = TextClassificationDataModule(**yaml.safe_load((d / "nolog.yaml").read_text())["data"])
    dm.setup("test")
    test = read_predictions(out / "predictions_test.csv")
    assert test["index"].tolist() == list(range(120)) and test["gold"].tolist() == dm.label_ids(
        "test"
    )
    assert (test["pred"] == test["gold"]).mean() == pytest.approx(metrics["test_acc"], abs=1e-6)
    val = read_predictions(out / "predictions_val.csv")  # fit's one validation epoch
    val_acc = json.loads((out / "metrics_val.json").read_text())["val_acc"]
    assert len(val["index"]) == 120 and (val["pred"] == val["gold"]).mean() == pytest.approx(
        val_acc
    )
    with pytest.raises(SystemExit) as done:
        main(["analyze", str(out), str(out), "--out", str(d / "analysis")])
    assert done.value.code == 0
    rows = {r["split"]: r for r in csv.DictReader((d / "analysis" / "agreement.csv").open())}
    assert sorted(rows) == ["test", "val"] and rows["test"]["rows"] == "120"
    assert float(rows["test"]["acc_a"]) == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert float(rows["test"]["kappa"]) == 1.0 and float(rows["test"]["mcnemar_p"]) == 1.0


def test_user_errors_are_one_clear_line(minilm_config):
    """Three `python -m layerfusion fit` processes at once (each is mostly the single-threaded import)."""
    bad_args = [
        ["--data.dataset", "sst3"],
        ["--model.encoders", '[{"name": "nobody/nothing"}]'],
        ["--model.hiden", "3"],
    ]
    with ThreadPoolExecutor(len(bad_args)) as pool:
        bad, missing, typo = pool.map(
            lambda args: run_cli(
                "fit", "--config", "full.yaml", *args, cwd=minilm_config, check=False
            ),
            bad_args,
        )
    assert bad.returncode == 2
    assert _one_error_line(bad.stderr).startswith("layerfusion: error: unknown dataset 'sst3'")
    assert missing.returncode == 2
    line = _one_error_line(missing.stderr)
    assert line.startswith("layerfusion: error: model 'nobody/nothing' not found")
    assert "make models" in line and "HF_HUB_OFFLINE" in line
    assert typo.returncode != 0 and "hiden" in typo.stderr


def _one_error_line(stderr: str) -> str:
    """The error a failed run reports, checked to be one line: the last one, the only one about an error."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines[-5:]
    assert errors[0].startswith("layerfusion: error: "), errors[0]
    return errors[0]
