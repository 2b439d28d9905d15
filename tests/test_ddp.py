"""2-process CPU (Gloo) DDP runs of the real CLI with the real all-MiniLM-L6-v2 on real SST-2 rows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import conftest
import pytest
import yaml
from conftest import MINILM, REPO

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (Lightning's `ddp` relaunches that command per rank), with the
    test-only `ddp_probe` callback importable."""
    return conftest.run_cli(*args, cwd=cwd, env={"PYTHONPATH": str(TESTS)})


def _one_process(stage: str, cfg: Path, ckpt: str, cwd: Path) -> subprocess.CompletedProcess:
    """`stage` of the same checkpoint in a single process, for comparison with the DDP figure."""
    return run_cli(
        stage,
        "--config",
        str(cfg),
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "auto",
        "--ckpt_path",
        ckpt,
        cwd=cwd,
    )


def _config(d: Path, shared_data: Path, **data) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["encoders"] = [{"name": MINILM, "max_length": 64}]
    cfg["model"]["cache_dir"] = str(d / "cache")
    cfg["data"].update(dataset="sst2", data_dir=str(shared_data), batch_size=32, **data)
    cfg["trainer"].update(max_epochs=2, strategy="ddp", devices=2)
    cfg["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs/quickstart", "name": "logs"},
    }
    cfg["trainer"]["callbacks"] = [
        c for c in cfg["trainer"]["callbacks"] if "EarlyStopping" not in c["class_path"]
    ]
    cfg["trainer"]["callbacks"].append(
        {"class_path": "ddp_probe.RecordRanks", "init_args": {"out": str(d / "probe")}}
    )
    path = d / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("runs/quickstart", str(d / "run")))
    return path


def _ranks(d: Path) -> list[dict]:
    return [json.loads((d / "probe" / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_fit_shards_rows_and_extraction_and_syncs_everything(tmp_path, shared_data):
    cfg = _config(tmp_path, shared_data, max_train_samples=300, max_eval_samples=200)
    fit = run_cli("fit", "--config", str(cfg), cwd=tmp_path)

    # feature extraction is split the same way: each rank extracts half of each split
    for r in range(2):
        assert f"extracted all-MiniLM-L6-v2/train shard {r}/2: 150 rows" in fit.stderr
        assert f"extracted all-MiniLM-L6-v2/val shard {r}/2: 100 rows" in fit.stderr
    assert not list((tmp_path / "cache").rglob("*.part*")), "part entries are merged and removed"

    rank0, rank1 = _ranks(tmp_path)
    assert rank0["world"] == 2
    for epoch in ("0", "1"):  # every training row exactly once per epoch across ranks
        rows0, rows1 = rank0["rows"][epoch], rank1["rows"][epoch]
        assert len(rows0) == len(rows1) == 150
        assert sorted(rows0 + rows1) == list(range(300))
    assert rank0["head"] == rank1["head"]  # identical weights on both ranks
    assert rank0["val_acc"] == rank1["val_acc"]  # synced metric

    # only rank 0 writes: one checkpoint set, one logger version
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    assert [p.name for p in (tmp_path / "run" / "logs").iterdir()] == ["version_0"]

    # the DDP val metric covers the whole dev slice: a 1-process validate of the same weights agrees
    last = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    one = _one_process("validate", cfg, last, tmp_path)
    assert _printed(one.stdout, "val_acc") == pytest.approx(rank0["val_acc"], abs=1e-6)
    two = run_cli("test", "--config", str(cfg), "--ckpt_path", last, cwd=tmp_path)
    one = _one_process("test", cfg, last, tmp_path)
    assert _printed(two.stdout, "test_acc") == pytest.approx(
        _printed(one.stdout, "test_acc"), abs=1e-6
    )


def test_ddp_streaming_shards_the_stream(tmp_path, shared_data):
    data = tmp_path / "data"
    data.mkdir()
    rows = (shared_data / "sst2" / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[:301]) + "\n")  # odd: one row must be dropped
    (data / "dev.jsonl").write_text("\n".join(rows[301:401]) + "\n")
    cfg = _config(tmp_path, shared_data, streaming=True)
    run_cli(
        "fit",
        "--config",
        str(cfg),
        "--data.dataset",
        str(data),
        "--model.features",
        "online",
        cwd=tmp_path,
    )
    rank0, rank1 = _ranks(tmp_path)
    for epoch in ("0", "1"):
        rows0, rows1 = rank0["rows"][epoch], rank1["rows"][epoch]
        assert len(rows0) == len(rows1) == 150  # equal counts, the odd row dropped
        assert sorted(rows0 + rows1) == list(range(300))  # each stream position exactly once
    assert rank0["head"] == rank1["head"]


def _printed(stdout: str, metric: str) -> float:
    """A metric from Lightning's printed results table."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if len(cells) == 2 and cells[0] == metric:
            return float(cells[1])
    raise AssertionError(f"{metric} not in output:\n{stdout}")
