"""Runs killed with SIGKILL: during feature extraction, and during fit; the next run recovers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MINILM, REPO

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
CHUNK_ROWS = 50


def _config(d: Path, shared_data: Path, train: int, record: Path | None = None) -> Path:
    """The quickstart on SST-2 rows with MiniLM, cache chunks of 50 rows; with `record`, the test-only
    `ddp_probe.RecordRanks` callback writes the rows each epoch of this process trained on (see `_start`:
    tests/ on the path)."""
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["encoders"] = [{"name": MINILM, "max_length": 64}]
    cfg["model"]["cache_dir"] = str(d / "cache")
    cfg["model"]["cache_chunk_rows"] = CHUNK_ROWS
    cfg["data"].update(
        dataset="sst2", data_dir=str(shared_data), max_train_samples=train, max_eval_samples=100
    )
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"] = [
        c for c in cfg["trainer"]["callbacks"] if "EarlyStopping" not in c["class_path"]
    ]
    if record is not None:
        cfg["trainer"]["callbacks"].append(
            {"class_path": "ddp_probe.RecordRanks", "init_args": {"out": str(record)}}
        )
    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("runs/quickstart", str(d / "run")))
    return path


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-m", "layerfusion", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, (
            f"process ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        )
        assert time.time() < deadline, "condition never met"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return err


def test_killed_during_extraction_resumes_at_the_first_missing_chunk(tmp_path, shared_data):
    """SIGKILL of the real CLI while it extracts the train split (16 chunks of 50 rows): the rerun keeps
    every chunk written before the kill (same files, untouched), extracts only the others, and the
    entry is bit-identical to an uninterrupted build. The work lost is at most the chunk in progress."""
    cfg = _config(tmp_path, shared_data, train=800)
    cache = tmp_path / "cache"
    proc = _start("fit", "--config", str(cfg), "--trainer.max_epochs", "1", cwd=tmp_path)
    _kill_when(proc, lambda: any(cache.rglob(".train-*.build-*/*.npy")))
    (build,) = cache.rglob(".train-*.build-*")
    before = {p.name: p.stat().st_mtime_ns for p in build.glob("*.npy")}
    assert 1 <= len(before) < 16, "killed after a chunk was written, before the last"
    assert not [p for p in cache.rglob("manifest.json") if "train-" in p.parent.name], (
        "no complete-looking train entry"
    )

    err = _finish(_start("fit", "--config", str(cfg), "--trainer.max_epochs", "1", cwd=tmp_path))
    done = len(before)
    assert f"resuming all-MiniLM-L6-v2/train: {done} chunks already built (verified)" in err
    assert f"extracted all-MiniLM-L6-v2/train: {800 - 50 * done} rows" in err
    assert f"{16 - done} chunks -> " in err
    (entry,) = [p.parent for p in cache.rglob("manifest.json") if "train-" in p.parent.name]
    after = {p.name: p.stat().st_mtime_ns for p in entry.glob("*.npy")}
    assert len(after) == 16 and {k: after[k] for k in before} == before  # kept, not rewritten
    assert not build.exists() and not list(cache.rglob(".tmp-*"))

    # bit-identical to an uninterrupted extraction of the same rows
    from layerfusion.data.datamodule import TextClassificationDataModule
    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.features.cache import FeatureCache

    dm = TextClassificationDataModule(
        "sst2", data_dir=str(shared_data), max_train_samples=800, max_eval_samples=100
    )
    dm.setup("fit")
    encoder = FrozenEncoder(EncoderSpec(MINILM, max_length=64))
    fresh = FeatureCache(tmp_path / "fresh", chunk_rows=CHUNK_ROWS).load_or_build(
        encoder, dm.texts("train"), "train"
    )
    resumed_cache = FeatureCache(cache, chunk_rows=CHUNK_ROWS)
    resumed = resumed_cache.load_or_build(encoder, dm.texts("train"), "train")
    assert resumed_cache.last_build_seconds == 0.0, "the resumed entry is read, not extracted again"
    assert resumed.path == entry and torch.equal(fresh[:], resumed[:])


def test_killed_during_fit_resumes_from_last(tmp_path, shared_data):
    cfg = _config(tmp_path, shared_data, train=400, record=tmp_path / "probe")
    ckpts = tmp_path / "run" / "checkpoints"
    proc = _start("fit", "--config", str(cfg), "--trainer.max_epochs", "300", cwd=tmp_path)
    _kill_when(proc, lambda: (ckpts / "last.ckpt").is_file() and (ckpts / "best.ckpt").is_file())
    before = torch.load(ckpts / "last.ckpt", weights_only=True)  # complete, loadable
    assert before["epoch"] < 299
    assert not (tmp_path / "probe").exists(), "the killed run never reached the end of fit"

    _finish(
        _start(
            "fit",
            "--config",
            str(cfg),
            "--trainer.max_epochs",
            str(before["epoch"] + 3),
            "--ckpt_path",
            "last",
            cwd=tmp_path,
        )
    )
    # the second process ran exactly the remaining epochs, each over all 400 rows, from the restored
    # step (a restart from epoch 0 would have run before + 3 epochs and counted its steps from 0)
    record = json.loads((tmp_path / "probe" / "fit-rank0.json").read_text())
    assert sorted(map(int, record["rows"])) == [before["epoch"] + 1, before["epoch"] + 2]
    assert all(sorted(rows) == list(range(400)) for rows in record["rows"].values())
    steps_per_epoch = math.ceil(400 / yaml.safe_load(cfg.read_text())["data"]["batch_size"])
    assert record["steps"] == [
        before["global_step"],
        before["global_step"] + 2 * steps_per_epoch,
    ]
