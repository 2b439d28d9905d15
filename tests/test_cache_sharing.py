"""Jobs sharing one cache_dir, recovery that keeps good data, row indexing, and chunk sizing (issue 27
items 7, 9, 10, 12). Tiny random BERT, no Lightning except in the RunReport and PredictionWriter tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import layerfusion.features.entry as entry_mod
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features.cache import FeatureCache, FeatureCacheError
from layerfusion.files import owner_tag, temp_path, temp_prefix

TESTS = Path(__file__).parent
TEXTS = [f"sentence number {i} " + "word " * (i % 7) for i in range(23)]


@pytest.fixture
def encoder(tiny_models) -> FrozenEncoder:
    return FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _dotfiles(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


def test_jobs_released_at_a_barrier_build_one_entry_together(tmp_path, tiny_models):
    """Three processes start the same build at once: none fails, each chunk is extracted once in all
    (10 chunks), one entry, nothing left beside or inside it."""
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    outs = [tmp_path / f"job{j}.json" for j in range(3)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "cache_job.py"), tiny_models["bert"], str(cache)]
            + [str(barrier), "3", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    results = [json.loads(o.read_text()) for o in outs]
    assert [r.get("error") for r in results] == [None, None, None]
    assert sum(r["extracted"] for r in results) == 10, results  # 40 rows in chunks of 4
    assert len({r["entry"] for r in results}) == 1
    (manifest,) = cache.rglob("manifest.json")
    assert len(json.loads(manifest.read_text())["chunks"]) == 10
    assert _dotfiles(cache) == []  # no .tmp-*, no build directory, no lock file


def test_an_unreadable_manifest_keeps_the_chunks_that_verify(tmp_path, encoder, monkeypatch):
    cache = FeatureCache(tmp_path, "float32", chunk_rows=5)
    good = cache.load_or_build(encoder, TEXTS, "train")[:]
    entry = cache.entry_dir(cache.key(encoder, TEXTS, "train"))
    (entry / "manifest.json").write_text("{not json")
    chunks = sorted(entry.glob("*.npy"))
    data = bytearray(chunks[1].read_bytes())
    data[-3] ^= 0xFF  # one chunk no longer matches its hash
    chunks[1].write_bytes(bytes(data))
    extracted, real = [], entry_mod.np.save

    monkeypatch.setattr(
        entry_mod.np, "save", lambda f, a, **k: extracted.append(len(a)) or real(f, a, **k)
    )
    again = cache.load_or_build(encoder, TEXTS, "train")
    assert extracted == [5], "only the chunk that failed verification is extracted again"
    assert torch.equal(again[:], good)
    assert _dotfiles(tmp_path) == []


def test_a_layer_set_entry_with_a_broken_or_missing_manifest_is_rebuilt(tmp_path, encoder):
    cache = FeatureCache(tmp_path, "float32", chunk_rows=5)
    good = cache.load_or_build(encoder, TEXTS, "train", layers=[0, 2])[:]
    entry = cache.entry_dir(cache.key(encoder, TEXTS, "train", layers=[0, 2]))
    assert entry.name.rpartition("-")[2].startswith("S")
    for damage in ("{broken", None):
        if damage is None:
            (entry / "manifest.json").unlink()
        else:
            (entry / "manifest.json").write_text(damage)
        again = cache.load_or_build(encoder, TEXTS, "train", layers=[0, 2])
        assert again.path == entry and torch.equal(again[:], good)
        assert cache.last_build_seconds > 0  # rebuilt (from the kept chunks), not failed


def test_leftovers_of_dead_owners_are_cleaned_and_live_ones_kept(tmp_path, encoder):
    """Once the entry is complete: a killed job's temporary chunk and an abandoned build in another chunk
    layout are removed; the build of a live job (another process, building in chunks of 9 rows) stays.
    The owner tag names this boot, so two hosts with the same name never judge each other's pids."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    assert boot in owner_tag()
    cache = FeatureCache(tmp_path, "float32", chunk_rows=5)
    entry = cache.entry_dir(cache.key(encoder, TEXTS, "train"))
    builds = {n: entry.with_name(f".{entry.name}.build-{n}") for n in (5, 7, 9)}
    for d in builds.values():
        d.mkdir(parents=True, exist_ok=True)
        (d / ("000000." + "0" * 64 + ".npy")).write_bytes(b"not a chunk")  # fails verification
    dead = builds[5] / f"{entry_mod.tmp_prefix()}{_dead_pid()}-deadbeef"
    dead.write_bytes(b"partial")
    holder = subprocess.Popen(
        [sys.executable, "-c", LIVE_BUILDER, str(entry)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "building"
        cache.load_or_build(encoder, TEXTS, "train")
        assert _dotfiles(tmp_path) == [builds[9].name]
    finally:
        holder.kill()
        holder.wait()
    assert not list(entry.glob(".*")) and len(list(entry.glob("*.npy"))) == 5


LIVE_BUILDER = """
import sys, time
from pathlib import Path
from layerfusion.features.locks import EntryLock
lock = EntryLock(Path(sys.argv[1]))
lock.building(9)
print("building", flush=True)
time.sleep(600)
"""


def test_prediction_writer_removes_what_killed_runs_left(tmp_path):
    """`.predictions.jsonl.tmp-*` and `.parts-*` of dead processes go at the next predict's start;
    those of live ones stay."""
    from layerfusion.callbacks.prediction_writer import PredictionWriter, _parts_prefix

    out = tmp_path / "predictions.jsonl"
    dead_tmp = tmp_path / f"{temp_prefix(out)}{_dead_pid()}-a1b2"
    live_tmp = temp_path(out)
    dead_parts = tmp_path / f"{_parts_prefix(out)}{_dead_pid()}-0123abcd"
    live_parts = tmp_path / f"{_parts_prefix(out)}{os.getpid()}-0123abcd"
    dead_tmp.write_text("partial")
    live_tmp.write_text("being written")
    for d in (dead_parts, live_parts):
        d.mkdir()
        (d / "rank0.jsonl").write_text("0\t{}\n")
    assert sorted(PredictionWriter(str(out)).remove_leftovers()) == sorted([dead_parts, dead_tmp])
    assert _dotfiles(tmp_path) == sorted([live_tmp.name, live_parts.name])


def test_rows_repeated_or_given_as_a_mask_read_as_a_tensor_would(tmp_path, encoder):
    feats = FeatureCache(tmp_path, "float32", chunk_rows=10).load_or_build(encoder, TEXTS, "train")
    dense = feats[:]
    for rows in ([5, 5, 7], [7, 5, 5], [9, 9, 10, 10], [0, 0, 0]):
        assert torch.equal(feats[rows], dense[rows]), rows
        assert torch.equal(feats[torch.tensor(rows)], dense[torch.tensor(rows)])
    mask = torch.arange(23) % 3 == 0
    assert torch.equal(feats[mask], dense[mask]) and torch.equal(feats[mask.numpy()], dense[mask])
    with pytest.raises(IndexError, match="mask needs shape"):
        feats[torch.ones(5, dtype=torch.bool)]
    with pytest.raises(IndexError, match="integers or a bool mask"):
        feats[np.array([1.0, 2.0])]


def test_chunks_are_sized_in_bytes(tmp_path, encoder):
    """tiny BERT: 3 layers x 32 x 4 B = 384 B a row; 2,000 B hold 5 rows of every layer, 15 of one;
    `chunk_rows` bounds the rows too."""
    cache = FeatureCache(tmp_path, "float32", chunk_bytes=2000)
    assert cache.rows_per_chunk(3, 32) == 5 and cache.rows_per_chunk(1, 32) == 15
    every = cache.load_or_build(encoder, TEXTS, "train")
    one = FeatureCache(tmp_path / "one", "float32", chunk_bytes=2000).load_or_build(
        encoder, TEXTS, "train", layers=[1]
    )
    assert every.manifest["chunk_rows"] == 5 and one.manifest["chunk_rows"] == 15
    default = FeatureCache(tmp_path)
    assert default.rows_per_chunk(33, 4096) == 248  # 128 MiB: a 33-layer 4096-wide decoder
    assert default.rows_per_chunk(7, 384) == 4096  # MiniLM: the row bound
    assert FeatureCache(tmp_path, chunk_rows=3, chunk_bytes=2000).rows_per_chunk(3, 32) == 3


def test_a_float32_overflow_chunk_is_checked_against_free_space_in_float32(
    tmp_path, tiny_models, monkeypatch
):
    """The disk check at the start counts float16; a chunk that overflows float16 is stored in float32,
    so its real size is checked before it is written: a clear error, not a half-written disk."""
    encoder = FrozenEncoder(EncoderSpec(tiny_models["gpt2"], pooling="mean", max_length=16))
    token = encoder.tokenizer.convert_tokens_to_ids("banana")
    with torch.no_grad():
        encoder.model.wte.weight[token] *= 1e8  # rows with this token exceed 65,504
    texts = [*TEXTS[:9], "a banana here", *TEXTS[9:]]
    half = len(texts) * encoder.num_layers * encoder.hidden_size * 2
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=half + half // 2))
    with pytest.raises(FeatureCacheError, match=r"not enough disk space .* as float32"):
        FeatureCache(tmp_path, "float16").load_or_build(encoder, texts, "train")


def test_resume_verification_lists_the_build_directory_a_constant_number_of_times(
    tmp_path, encoder, monkeypatch
):
    """Resuming a build of 6 or of 12 chunks (one missing, the others verified) lists directories the
    same number of times: verification is linear in the chunks, not quadratic."""
    counts = []
    for chunk_rows in (4, 2):
        cache = FeatureCache(tmp_path / str(chunk_rows), "float32", chunk_rows=chunk_rows)
        cache.load_or_build(encoder, TEXTS, "train")
        entry = cache.entry_dir(cache.key(encoder, TEXTS, "train"))
        sorted(entry.glob("*.npy"))[4].unlink()
        listings = []
        for name in ("scandir", "listdir"):
            real = getattr(os, name)
            monkeypatch.setattr(
                os, name, lambda *a, real=real, seen=listings: seen.append(a) or real(*a)
            )
        cache.load_or_build(encoder, TEXTS, "train")
        monkeypatch.undo()
        assert cache.last_build_seconds > 0
        counts.append(len(listings))
    assert counts[0] == counts[1], counts


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_run_report_keeps_row_numbers_exact_beyond_float32(tmp_path):
    """Rows 2**24 and 2**24 + 1 are one number in float32: RunReport keeps row numbers as int64, in its
    metrics and in the per-row predictions it writes."""
    import lightning as L
    from layerfusion.callbacks.run_report import RunReport

    class Tiny(L.LightningModule):
        label_names, encoders = ["a", "b"], {}

        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(1, 2)

        def test_step(self, batch, batch_idx):
            return {"preds": batch["index"] % 2}  # right on rows 0 and 3 below

    big = 2**24
    rows = [
        {"index": torch.tensor(big + i), "labels": torch.tensor([0, 0, 1, 1][i])} for i in range(4)
    ]
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        callbacks=[RunReport(splits=("test",))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(Tiny(), torch.utils.data.DataLoader(rows, batch_size=4), verbose=False)
    metrics = json.loads((tmp_path / "metrics_test.json").read_text())
    assert metrics["rows"] == 4 and metrics["confusion_matrix"] == [[1, 1], [1, 1]]
    written = (tmp_path / "predictions_test.csv").read_text().splitlines()
    assert written == ["index,pred,gold"] + [
        f"{big + i},{i % 2},{[0, 0, 1, 1][i]}" for i in range(4)
    ]
