"""2-process CPU (Gloo) DDP runs of the real CLI with the real all-MiniLM-L6-v2 on real SST-2 rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import torch
import yaml
from conftest import MINILM, REPO, run_script
from ddp_probe import collectives_nccl_accepts, process_groups_left_alive

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
CHUNK_ROWS = 64
"""300 train / 301 dev rows: 5 chunks each, rank 0 extracts chunks 0, 2, 4 and rank 1 chunks 1, 3."""


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (Lightning's `ddp` relaunches that command per rank), with the
    test-only `ddp_probe` callback importable."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return conftest.run_cli(*args, cwd=cwd, env={"PYTHONPATH": path})


def _one_process(stage: str, cfg: Path, ckpt: str, monkeypatch) -> None:
    """`stage` of the same checkpoint on one device in this process (no second `import lightning` to
    pay for), for comparison with the DDP figure."""
    from layerfusion.cli import cli_main

    with monkeypatch.context() as m:
        m.chdir(cfg.parent)
        m.setattr(sys, "argv", ["layerfusion"])  # the CLI's arguments are `args`, not pytest's
        single = ["--trainer.devices", "1", "--trainer.strategy", "auto", "--ckpt_path", ckpt]
        cli_main([stage, "--config", str(cfg), *single])


def _config(d: Path, shared_data: Path, **data) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["encoders"] = [{"name": MINILM, "max_length": 64}]
    cfg["model"]["cache_dir"] = str(d / "cache")
    cfg["model"]["cache_chunk_rows"] = CHUNK_ROWS
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
    cfg["trainer"]["callbacks"].append(
        {"class_path": "ddp_probe.RecordCollectives", "init_args": {"out": str(d / "probe")}}
    )
    path = d / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("runs/quickstart", str(d / "run")))
    return path


def _ranks(d: Path, stage: str = "fit") -> list[dict]:
    return [json.loads((d / "probe" / f"{stage}-rank{r}.json").read_text()) for r in range(2)]


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ddp_fit_shards_rows_and_extraction_and_syncs_everything(
    tmp_path, shared_data, monkeypatch
):
    """2 processes: training rows split, extraction shared out by chunks, and validation, test and
    predict on an odd number of rows (301) each see every row exactly once: the figures and predictions
    equal a single process's."""
    cfg = _config(tmp_path, shared_data, max_train_samples=300, max_eval_samples=301)
    fit = run_cli("fit", "--config", str(cfg), cwd=tmp_path)
    # each rank destroys its Gloo group at exit: left to finalization, it can abort a finished run
    assert process_groups_left_alive(tmp_path / "probe") == []

    # feature extraction is shared out by whole chunks: chunk i on rank i % 2
    for split, last in (("train", 44), ("val", 45)):
        rank0 = f"extracted all-MiniLM-L6-v2/{split} rank 0/2: {128 + last} rows"
        assert rank0 in fit.stderr and "3 chunks" in fit.stderr.split(rank0)[1].splitlines()[0]
        rank1 = f"extracted all-MiniLM-L6-v2/{split} rank 1/2: 128 rows"
        assert rank1 in fit.stderr and "2 chunks" in fit.stderr.split(rank1)[1].splitlines()[0]
    assert not list((tmp_path / "cache").rglob(".*.build-*")), (
        "build directories renamed into place"
    )
    _entries_equal_a_single_process_build(tmp_path, shared_data)

    rank0, rank1 = _ranks(tmp_path)
    assert rank0["world"] == 2
    for epoch in ("0", "1"):  # every training row exactly once per epoch across ranks
        rows0, rows1 = rank0["rows"][epoch], rank1["rows"][epoch]
        assert len(rows0) == len(rows1) == 150
        assert sorted(rows0 + rows1) == list(range(300))
    # validation: every one of the 301 rows exactly once, unpadded (151 + 150)
    _exactly_once(rank0["eval_rows"]["val"], rank1["eval_rows"]["val"], 301)
    assert rank0["head"] == rank1["head"]  # identical weights on both ranks
    assert rank0["val_acc"] == rank1["val_acc"]  # synced metric

    # every collective of the fit (the cache build included): what NCCL accepts
    assert collectives_nccl_accepts(tmp_path / "probe", "fit") > 0
    # only rank 0 writes: one checkpoint set, one logger version
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    assert [p.name for p in (tmp_path / "run" / "logs").iterdir()] == ["version_0"]

    # the DDP val metric covers the whole dev slice once: a 1-process validate of the same weights
    # agrees. (best.ckpt and the val_acc DDP computed for it: Lightning 2.6 refreshes last.ckpt only on
    # epochs that save a top-k checkpoint, so last.ckpt need not hold the final weights.)
    best = str(tmp_path / "run" / "checkpoints" / "best.ckpt")
    saved = torch.load(best, weights_only=True)
    ddp_val_acc = next(v for k, v in saved["callbacks"].items() if "ModelCheckpoint" in k)
    (tmp_path / "run" / "metrics_val.json").unlink(missing_ok=True)  # the validate writes anew
    _one_process("validate", cfg, best, monkeypatch)
    one_val = json.loads((tmp_path / "run" / "metrics_val.json").read_text())
    assert one_val["rows"] == 301 and one_val["val_acc"] == pytest.approx(
        ddp_val_acc["best_model_score"].item(), abs=1e-6
    )

    # test and predict under DDP: every row once; predictions equal a single process's, row by row
    two = run_cli("test", "--config", str(cfg), "--ckpt_path", best, cwd=tmp_path)
    _exactly_once(*(r["eval_rows"]["test"] for r in _ranks(tmp_path, "test")), 301)
    written = tmp_path / "run" / "predictions.jsonl"
    run_cli("predict", "--config", str(cfg), "--ckpt_path", best, cwd=tmp_path)
    _exactly_once(*(r["eval_rows"]["predict"] for r in _ranks(tmp_path, "predict")), 301)
    for stage in ("test", "predict"):
        assert collectives_nccl_accepts(tmp_path / "probe", stage) > 0
    ddp_rows = _predictions(written)
    _one_process("predict", cfg, best, monkeypatch)
    one_rows = _predictions(written)
    assert len(ddp_rows) == len(one_rows) == 301
    assert [r["text"] for r in ddp_rows] == [r["text"] for r in one_rows]
    assert [r["label"] for r in ddp_rows] == [r["label"] for r in one_rows]
    for a, b in zip(ddp_rows, one_rows, strict=True):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-6)
    # the DDP test accuracy is the single-process predictions' accuracy over all 301 rows
    correct = sum(r["label"] == r["gold"] for r in one_rows)
    assert _printed(two.stdout, "test_acc") == pytest.approx(correct / 301, abs=1e-6)
    report = json.loads((tmp_path / "run" / "metrics_test.json").read_text())
    assert report["rows"] == 301 and sum(map(sum, report["confusion_matrix"])) == 301
    # RunReport's per-row test predictions, gathered from both ranks: every row once, as one process's
    from layerfusion.analysis import read_predictions

    ddp_test = read_predictions(tmp_path / "run" / "predictions_test.csv")
    names = saved["layerfusion"]["label_names"]
    assert ddp_test["index"].tolist() == list(range(301))
    assert [names[p] for p in ddp_test["pred"]] == [r["label"] for r in one_rows]


def _exactly_once(rows0: list[int], rows1: list[int], n: int) -> None:
    assert abs(len(rows0) - len(rows1)) <= 1, (len(rows0), len(rows1))
    assert sorted(rows0 + rows1) == list(range(n))


def _entries_equal_a_single_process_build(d: Path, shared_data: Path) -> None:
    """The entries the ranks built chunk by chunk hold the rows of a fresh 1-process build, in order."""
    from layerfusion.data.datamodule import TextClassificationDataModule
    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.features.cache import FeatureCache

    dm = TextClassificationDataModule(
        "sst2", data_dir=str(shared_data), max_train_samples=300, max_eval_samples=301
    )
    dm.setup("fit")
    encoder = FrozenEncoder(EncoderSpec(MINILM, max_length=64))
    ddp_cache = FeatureCache(d / "cache", chunk_rows=CHUNK_ROWS)
    fresh_cache = FeatureCache(d / "fresh", chunk_rows=CHUNK_ROWS)
    for split in ("train", "val"):
        ranks = ddp_cache.load_or_build(encoder, dm.texts(split), split)
        assert ddp_cache.last_build_seconds == 0.0, f"{split}: the DDP entry was not a cache hit"
        fresh = fresh_cache.load_or_build(encoder, dm.texts(split), split)
        assert ranks.shape == fresh.shape == (len(dm.texts(split)), 7, 384)
        # the same chunks in the same batches: equal up to the float16 rounding of the last bit
        # (the ranks computed with one thread each, this process with two)
        torch.testing.assert_close(ranks[:].float(), fresh[:].float(), atol=1e-3, rtol=1e-3)


SPAWN_PROBE = """
import json, sys
from pathlib import Path

import torch
from lightning.fabric import Fabric

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features.cache import FeatureCache, FeatureCacheError


def run(fabric, model, out):
    encoder = FrozenEncoder(EncoderSpec(model, max_length=16))
    cache = FeatureCache(Path(out) / "cache", "float32")
    one = cache.load_or_build(encoder, ["the only row"], "predict", dist=fabric)
    result = {"shape": list(one.shape), "row": one[0].sum().item()}
    try:
        cache.load_or_build(encoder, [], "empty", dist=fabric)
    except FeatureCacheError as err:
        result["empty"] = str(err)
    (Path(out) / f"rank{fabric.global_rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()  # a Gloo group left to the exit can abort the process


if __name__ == "__main__":
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(run, sys.argv[1], sys.argv[2])
"""


def test_one_row_and_empty_splits_on_two_spawned_ranks_do_not_hang(tmp_path, tiny_models):
    """A 1-row split on 2 ddp_spawn ranks (Gloo): rank 1 has no chunk, both get the row; an empty split:
    the same clear error on both ranks. Neither hangs (the subprocess has a timeout)."""
    run_script(SPAWN_PROBE, tiny_models["bert"], str(tmp_path), tmp_path=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["shape"] == ranks[1]["shape"] == [1, 3, 32]
    assert ranks[0]["row"] == ranks[1]["row"]
    assert all("split 'empty' has no texts" in r["empty"] for r in ranks)


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
        # `index` is the row's line in train.jsonl: 300 distinct rows of the 301, none twice
        # (which one is dropped depends on the epoch's shuffle)
        assert len(set(rows0 + rows1)) == 300 and set(rows0 + rows1) <= set(range(301))
    # the epochs were shuffled differently (the stream is reseeded from the trainer's epoch)
    assert rank0["rows"]["0"] != rank0["rows"]["1"]
    assert rank0["head"] == rank1["head"]


def _printed(stdout: str, metric: str) -> float:
    """A metric from Lightning's printed results table."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if len(cells) == 2 and cells[0] == metric:
            return float(cells[1])
    raise AssertionError(f"{metric} not in output:\n{stdout}")
