"""End to end: the real CLI in subprocesses, real all-MiniLM-L6-v2, a slice of real SST-2."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import conftest
import pytest
import torch
import yaml
from conftest import MINILM, REPO
from wandb_records import read_run

pytestmark = pytest.mark.slow
SECRET = "sk-layerfusion-test-secret-0123456789"  # a fake key in the environment: must never be written anywhere


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI with W&B offline and fake secrets in the environment (which must never be written)."""
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET}
    return conftest.run_cli(*args, cwd=cwd, env=env, check=check)


def _metrics(csv_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(next(csv_dir.rglob("metrics.csv")).open()))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data) -> Path:
    """A config for MiniLM on SST-2 (600 train / 200 dev / 200 test), turned into a full config by --print_config."""
    d = tmp_path_factory.mktemp("cli")
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["encoders"] = [{"name": MINILM, "max_length": 64}]
    cfg["model"]["cache_dir"] = str(d / "cache")
    cfg["model"]["cache_dtype"] = (
        "float32"  # predict's features then equal the Classifier's online ones
    )
    cfg["data"].update(
        dataset="sst2", data_dir=str(shared_data), max_train_samples=600, max_eval_samples=200
    )
    cfg["trainer"]["max_epochs"] = 6
    cfg["trainer"]["callbacks"][:0] = [
        {
            "class_path": "layerfusion.callbacks.LayerImportance",
            "init_args": {"attention_samples": 32},
        },
        {
            "class_path": "layerfusion.callbacks.LayerSelection",
            "init_args": {"strategy": "top_k", "k": 3},
        },
    ]
    text = yaml.safe_dump(cfg).replace("runs/quickstart", str(d / "run"))
    (d / "small.yaml").write_text(text)
    full = run_cli("fit", "--config", "small.yaml", "--print_config", cwd=d).stdout
    (d / "full.yaml").write_text(full)
    assert yaml.safe_load(full)["model"]["head"] == "gated"
    return d


def test_fit_validate_test_predict(run_dir):
    d = run_dir
    fit = run_cli("fit", "--config", "full.yaml", cwd=d)
    assert "extracted all-MiniLM-L6-v2/train: 600 rows" in fit.stderr
    best = d / "run" / "checkpoints" / "best.ckpt"
    assert best.is_file() and best.stat().st_size < 5e6
    ckpt = torch.load(best, weights_only=True)
    assert all(k.startswith("head.") for k in ckpt["state_dict"])
    assert ckpt["layerfusion"]["label_names"] == ["0", "1"]
    best_val = max(
        v["best_model_score"].item()
        for k, v in ckpt["callbacks"].items()
        if k.startswith("ModelCheckpoint") and "'monitor': 'val_acc'" in k
    )
    assert best_val > 0.7  # MiniLM's layers separate SST-2 well even from 600 examples

    logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir"]
    val = run_cli(
        "validate",
        "--config",
        "full.yaml",
        "--ckpt_path",
        str(best),
        *logger,
        str(d / "val"),
        cwd=d,
    )
    assert "feature cache hit" in val.stderr  # the dev features were extracted once, by fit
    assert _metrics(d / "val")["val_acc"] == pytest.approx(best_val, abs=0)

    run_cli(
        "test", "--config", "full.yaml", "--ckpt_path", str(best), *logger, str(d / "test"), cwd=d
    )
    test_acc = _metrics(d / "test")["test_acc"]
    assert 0.6 < test_acc <= 1.0

    # the fit run's own W&B logger (offline, from the quickstart config) recorded the run
    wandb_runs = sorted((d / "run" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    record = read_run(wandb_runs[0])
    assert record["history"]["val_acc"][-1] > 0.5 and "val_f1_0" in record["history"]
    assert record["config"]["config"]["model"]["head"] == "gated"  # the full resolved config
    assert "resources/train_s" in record["history"] and "resources/extract_s" in record["history"]
    assert list(
        (wandb_runs[0] / "files" / "media" / "images" / "val").glob("confusion_matrix*.png")
    )
    media = wandb_runs[0] / "files" / "media"
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
    assert len(rows) == 200
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

    mine = Classifier.from_checkpoint(best, device="cpu").predict([r["text"] for r in rows])
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


def test_without_a_logger_the_run_files_are_still_written_and_reported(run_dir):
    d = run_dir
    out = d / "nolog"
    run_cli(
        "fit",
        "--config",
        "full.yaml",
        "--trainer.logger",
        "false",
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        str(out),
        cwd=d,
    )
    assert not (out / "wandb").exists()
    for name in (
        "run.json",
        "metrics_val.json",
        "metrics_val.csv",
        "confusion_val.png",
        "resources.json",
    ):
        assert (out / name).is_file(), name
    assert "val_f1_1" in (out / "metrics_val.csv").read_text()
    best = d / "run" / "checkpoints" / "best.ckpt"  # ModelCheckpoint's dirpath is set in the config
    run_cli(
        "test",
        "--config",
        "full.yaml",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(out),
        "--ckpt_path",
        str(best),
        cwd=d,
    )
    assert not (out / "wandb").exists()
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert 0.5 < metrics["test_acc"] <= 1 and 0 < metrics["test_f1"] <= 1
    report = run_cli("report", str(out), "--out", str(d / "report"), cwd=d)
    assert "results.md" in report.stdout
    table = (d / "report" / "results.md").read_text()
    assert "| nolog | sst2 | gated | all-MiniLM-L6-v2 |" in table
    assert f"| {metrics['test_acc']:.4f} | {metrics['test_f1']:.4f} |" in table
    assert (d / "report" / "accuracy.png").stat().st_size > 1000


def test_user_errors_are_one_clear_line(run_dir):
    bad = run_cli(
        "fit", "--config", "full.yaml", "--data.dataset", "sst3", cwd=run_dir, check=False
    )
    assert bad.returncode == 2
    assert _one_error_line(bad.stderr).startswith("layerfusion: error: unknown dataset 'sst3'")
    missing = run_cli(
        "fit",
        "--config",
        "full.yaml",
        "--model.encoders",
        '[{"name": "nobody/nothing"}]',
        cwd=run_dir,
        check=False,
    )
    assert missing.returncode == 2
    line = _one_error_line(missing.stderr)
    assert line.startswith("layerfusion: error: model 'nobody/nothing' not found")
    assert "make models" in line and "HF_HUB_OFFLINE" in line
    typo = run_cli("fit", "--config", "full.yaml", "--model.hiden", "3", cwd=run_dir, check=False)
    assert typo.returncode != 0 and "hiden" in typo.stderr


def _one_error_line(stderr: str) -> str:
    """The error a failed run reports, checked to be one line: the last one, the only one about an error."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines[-5:]
    assert errors[0].startswith("layerfusion: error: "), errors[0]
    return errors[0]
