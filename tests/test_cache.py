"""FeatureCache: hits, misses on any key change, layer subsets, chunks (resumed, corrupt, rebuilt),
float16 overflow, key gaps, disk check, ranks, online == cached."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import layerfusion.features.cache as cache_mod
import layerfusion.features.entry as entry_mod
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features.cache import FeatureCache, FeatureCacheError, token_batches

TEXTS = [f"sentence number {i} " + "word " * (i % 7) for i in range(23)]


@pytest.fixture
def encoder(tiny_models) -> FrozenEncoder:
    return FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))


def _manifests(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("manifest.json"))]


def _chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.npy"))


def test_build_then_hit(tmp_path, encoder):
    cache = FeatureCache(tmp_path, "float32", batch_size=4, chunk_rows=5)
    first = cache.load_or_build(encoder, TEXTS, "train")
    assert first.shape == (23, 3, 32) and len(first) == 23 and first.layers == [0, 1, 2]
    assert first.dtype == torch.float32 and cache.last_build_seconds > 0
    again = cache.load_or_build(encoder, TEXTS, "train")
    assert cache.last_build_seconds == 0.0
    assert torch.equal(first[:], again[:])
    (manifest,) = _manifests(tmp_path)
    assert manifest["shape"] == [23, 3, 32] and manifest["layers"] == [0, 1, 2]
    assert [c["rows"] for c in manifest["chunks"]] == [5, 5, 5, 5, 3]
    assert all(len(c["sha256"]) == 64 and c["sha256"] in c["file"] for c in manifest["chunks"])
    entry = cache.entry_dir(cache.key(encoder, TEXTS, "train"))
    assert entry.name.endswith("-L3") and len(_chunk_files(tmp_path)) == 5
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no build dir left
    # rows as LongTensor, list, slice, int (negative too), and a further index like a tensor's
    rows = torch.tensor([22, 0, 7, 7, 13])
    expected = torch.stack([first[int(i)] for i in rows])
    assert torch.equal(first[rows], expected) and torch.equal(first[rows.tolist()], expected)
    assert torch.equal(first[3:9], torch.stack([first[i] for i in range(3, 9)]))
    assert torch.equal(first[-1], first[22]) and torch.equal(first[:, 2], first[:][:, 2])
    with pytest.raises(IndexError):
        first[23]


def test_cached_features_equal_one_batch_online_forward(tmp_path, encoder):
    feats = FeatureCache(tmp_path, "float32", batch_size=5, chunk_rows=7).load_or_build(
        encoder, TEXTS, "train"
    )
    batch = encoder.tokenizer(
        TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    online = encoder(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(feats[:], online, atol=1e-5, rtol=1e-4)
    half = FeatureCache(tmp_path / "h", "float16").load_or_build(encoder, TEXTS, "train")
    assert half.dtype == torch.float16 and half[:].dtype == torch.float16
    torch.testing.assert_close(half[:].float(), online, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "change",
    [
        lambda e, t: (EncoderSpec(e.spec.name, max_length=8), t),
        lambda e, t: (EncoderSpec(e.spec.name, max_length=16, pooling="cls"), t),
        lambda e, t: (e.spec, t[:-1] + ["a different last text"]),
    ],
    ids=["max_length", "pooling", "data"],
)
def test_any_key_change_is_a_new_entry(tmp_path, encoder, change):
    cache = FeatureCache(tmp_path, "float32")
    cache.load_or_build(encoder, TEXTS, "train")
    spec, texts = change(encoder, TEXTS)
    other = FrozenEncoder(spec) if spec is not encoder.spec else encoder
    assert cache.entry_dir(cache.key(other, texts, "train")) != cache.entry_dir(
        cache.key(encoder, TEXTS, "train")
    )
    cache.load_or_build(other, texts, "train")
    assert cache.last_build_seconds > 0
    assert len(_manifests(tmp_path)) == 2


def test_changed_weights_are_a_new_entry(tmp_path, encoder, tiny_models):
    cache = FeatureCache(tmp_path, "float32")
    k1 = cache.key(encoder, TEXTS, "train")
    other = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))
    with torch.no_grad():
        other.model.encoder.layer[0].output.dense.bias.add_(0.5)
    assert cache.key(other, TEXTS, "train")["weights_sha256"] != k1["weights_sha256"]


def test_key_covers_config_buffers_tokenizer_sides_and_text_boundaries(tmp_path, tiny_models):
    """The key gaps: a config-only change (same weights), a non-persistent buffer (rotary inv_freq), the
    truncation side, and texts that only differ in where one ends and the next begins."""
    cache = FeatureCache(tmp_path, "float32")
    base = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))
    key = cache.key(base, TEXTS, "train")
    assert key["transformers"].count(".") == 1  # major.minor
    eps = tmp_path / "eps"
    shutil.copytree(tiny_models["bert"], eps)
    config = json.loads((eps / "config.json").read_text())
    (eps / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-5}))
    changed = FrozenEncoder(EncoderSpec(str(eps), max_length=16))
    assert torch.equal(
        changed.model.embeddings.word_embeddings.weight,
        base.model.embeddings.word_embeddings.weight,
    )
    assert changed.fingerprint() != base.fingerprint()

    llama = FrozenEncoder(EncoderSpec(tiny_models["llama"], pooling="last", max_length=16))
    before = llama.fingerprint()
    inv_freq = llama.model.rotary_emb.inv_freq
    assert "rotary_emb.inv_freq" not in llama.model.state_dict()  # non-persistent
    inv_freq.mul_(0.5)
    llama._fingerprint = None
    assert llama.fingerprint() != before

    left = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))
    left.tokenizer.truncation_side = "left"
    assert left.tokenizer_fingerprint() != base.tokenizer_fingerprint()
    assert cache.key(left, TEXTS, "train") != key
    # the fingerprint is reused per tokenizer state, never across a change: an added token counts,
    # each call's truncation/padding settings do not
    before = left.tokenizer_fingerprint()
    left.tokenizer(TEXTS, truncation=True, max_length=5, padding=True)
    assert left.tokenizer_fingerprint() == before
    left.tokenizer.add_tokens(["zzqx"])
    assert left.tokenizer_fingerprint() != before

    a = cache.key(base, ["a\0", "b"], "train")["data_sha256"]
    assert a != cache.key(base, ["a", "\0b"], "train")["data_sha256"]
    with pytest.raises(FeatureCacheError, match=r"train: text 1 is not valid Unicode"):
        cache.key(base, ["fine", "bad \ud800"], "train")


def test_reader_refuses_a_lone_surrogate_naming_file_and_line(tmp_path):
    from layerfusion.data.readers import DataError, read_file

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": "bad \\ud800 text", "label": "b"}\n')
    with pytest.raises(
        DataError, match=r"train.jsonl:2: field 'text' has a lone surrogate \(U\+D800\)"
    ):
        read_file(path)


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest", "no_manifest"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, encoder, caplog, damage):
    """A chunk cut short or gone: only that chunk is extracted again; a broken or missing manifest: none
    (the chunks verify by their content hash)."""
    cache = FeatureCache(tmp_path, "float32", chunk_rows=6)
    good = cache.load_or_build(encoder, TEXTS, "train")[:]
    entry = cache.entry_dir(cache.key(encoder, TEXTS, "train"))
    chunk = sorted(entry.glob("*.npy"))[1]
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:-100])
    elif damage == "delete":
        chunk.unlink()
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{not json")
    else:
        (entry / "manifest.json").unlink()
    with caplog.at_level("INFO"):
        rebuilt = cache.load_or_build(encoder, TEXTS, "train")
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert cache.last_build_seconds > 0
    assert torch.equal(rebuilt[:], good)
    if damage in ("truncate", "delete"):
        assert (
            "resuming bert/train: 3 chunks already built (verified), 1 of 4 to extract"
            in caplog.text
        )
        assert "extracted bert/train: 6 rows" in caplog.text
    else:  # the chunks verify by their content hash: kept, none extracted again
        assert (
            "resuming bert/train: 4 chunks already built (verified), 0 of 4 to extract"
            in caplog.text
        )
        assert "extracted bert/train" not in caplog.text


def test_a_chunk_changed_on_disk_fails_its_read_then_only_it_is_rebuilt(tmp_path, encoder, caplog):
    """Checksums are verified on a chunk's first read in a process, not at every open."""
    cache = FeatureCache(tmp_path, "float32", chunk_rows=6)
    good = cache.load_or_build(encoder, TEXTS, "train")[:]
    entry = cache.entry_dir(cache.key(encoder, TEXTS, "train"))
    chunk = sorted(entry.glob("*.npy"))[2]
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF  # same size: the cheap check at open passes
    chunk.write_bytes(bytes(data))
    entry_mod._VERIFIED.clear()  # as in a new process
    feats = cache.load_or_build(encoder, TEXTS, "train")
    assert cache.last_build_seconds == 0.0
    assert torch.equal(feats[[0, 7]], good[[0, 7]])  # chunks 0 and 1 verify
    with pytest.raises(FeatureCacheError, match="fails its SHA-256 check"):
        feats[[13]]
    assert not chunk.exists()
    with caplog.at_level("INFO"):
        again = cache.load_or_build(encoder, TEXTS, "train")
    assert (
        "resuming bert/train: 3 chunks already built (verified), 1 of 4 to extract" in caplog.text
    )
    assert torch.equal(again[:], good)


def test_checksums_are_read_once_per_process(tmp_path, encoder, monkeypatch):
    cache = FeatureCache(tmp_path, "float32", chunk_rows=6)
    cache.load_or_build(encoder, TEXTS, "train")
    entry_mod._VERIFIED.clear()
    hashed = []
    real = entry_mod.file_sha256
    monkeypatch.setattr(entry_mod, "file_sha256", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        cache.load_or_build(encoder, TEXTS, "train")[:]
    assert len(hashed) == 4  # each of the 4 chunks once


def test_interrupted_build_resumes_at_the_first_missing_chunk(
    tmp_path, encoder, monkeypatch, caplog
):
    fresh = FeatureCache(tmp_path / "fresh", "float32", chunk_rows=5).load_or_build(
        encoder, TEXTS, "train"
    )
    cache = FeatureCache(tmp_path / "c", "float32", chunk_rows=5)
    real, calls = cache_mod.extract_chunk, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "extract_chunk", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        cache.load_or_build(encoder, TEXTS, "train")
    assert not _manifests(tmp_path / "c")
    (build,) = (tmp_path / "c").rglob(".train-*.build-5")
    assert len(list(build.glob("*.npy"))) == 2
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        resumed = cache.load_or_build(encoder, TEXTS, "train")
    assert (
        "resuming bert/train: 2 chunks already built (verified), 3 of 5 to extract" in caplog.text
    )
    assert "extracted bert/train: 13 rows" in caplog.text
    assert torch.equal(resumed[:], fresh[:])
    assert not build.exists()


def test_length_sorted_extraction_restores_row_order(tmp_path, encoder):
    texts = ["short", "a much much longer text with many many tokens in it", "mid sized text"]
    feats = FeatureCache(tmp_path, "float32", batch_size=1).load_or_build(encoder, texts, "x")
    for i, t in enumerate(texts):
        b = encoder.tokenizer([t], return_tensors="pt")
        np.testing.assert_allclose(
            feats[i].numpy(), encoder(b["input_ids"], b["attention_mask"])[0].numpy(), atol=1e-5
        )


def test_token_batches_stay_within_the_budget():
    lengths = [5, 40, 12, 40, 7, 3, 90, 12, 12, 1]
    batches = token_batches(lengths, token_budget=64)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches[0] == [6]  # longer than the budget: alone
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64
    assert [len(b) for b in token_batches(lengths, None, max_rows=4)] == [4, 4, 2]
    assert [len(b) for b in token_batches(lengths, 1000, max_rows=3)] == [3, 3, 3, 1]


class ThreadGroup:
    """Ranks as threads: `broadcast` through a shared slot between two waits on a real barrier."""

    def __init__(self, world: int) -> None:
        self.world, self.gate, self.slot = world, threading.Barrier(world, timeout=60), None

    def rank(self, r: int):
        group = self

        class Rank:
            global_rank, world_size = r, group.world

            def broadcast(self, obj, src: int = 0):
                if self.global_rank == src:
                    group.slot = obj
                group.gate.wait()
                value = group.slot
                group.gate.wait()
                return value

        return Rank()


def _ranks(world: int, run) -> dict:
    group, results, errors = ThreadGroup(world), {}, {}

    def target(r: int) -> None:
        try:
            results[r] = run(r, group.rank(r))
        except Exception as err:
            errors[r] = err

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return {"results": results, "errors": errors}


def test_ranks_take_whole_chunks_and_equal_a_single_process_build(tmp_path, encoder, tiny_models):
    single = FeatureCache(tmp_path / "one", "float32", batch_size=4, chunk_rows=5).load_or_build(
        encoder, TEXTS, "train"
    )
    encoders = [encoder, FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))]

    def run(r, dist):
        cache = FeatureCache(tmp_path / "two", "float32", batch_size=4, chunk_rows=5)
        return cache.load_or_build(encoders[r], TEXTS, "train", dist=dist)

    out = _ranks(2, run)
    assert not out["errors"]
    assert torch.equal(out["results"][0][:], single[:]) and torch.equal(
        out["results"][1][:], single[:]
    )
    assert len(_manifests(tmp_path / "two")) == 1
    assert not list((tmp_path / "two").rglob(".*.build-*"))


def test_ranks_share_out_the_chunks_a_killed_build_left_missing(
    tmp_path, encoder, tiny_models, monkeypatch, caplog
):
    """Chunks 0 and 1 of 5 were written before a failure; two ranks resume: rank 0 extracts the missing
    chunks 2 and 4, rank 1 chunk 3 (not chunk i on rank i % 2, which would leave rank 1 idle)."""
    single = FeatureCache(tmp_path / "one", "float32", chunk_rows=5).load_or_build(
        encoder, TEXTS, "train"
    )
    real, calls = cache_mod.extract_chunk, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "extract_chunk", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path / "two", "float32", chunk_rows=5).load_or_build(
            encoder, TEXTS, "train"
        )
    monkeypatch.undo()
    encoders = [encoder, FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))]

    def run(r, dist):
        cache = FeatureCache(tmp_path / "two", "float32", chunk_rows=5)
        return cache.load_or_build(encoders[r], TEXTS, "train", dist=dist)

    with caplog.at_level("INFO"):
        out = _ranks(2, run)
    assert not out["errors"]
    assert "extracted bert/train rank 0/2: 8 rows" in caplog.text  # chunks 2 (5 rows) and 4 (3)
    assert "extracted bert/train rank 1/2: 5 rows" in caplog.text  # chunk 3
    assert torch.equal(out["results"][1][:], single[:])


def test_fewer_rows_than_ranks_and_failures_do_not_hang(tmp_path, encoder, tiny_models):
    encoders = [encoder, FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))]
    one = _ranks(
        2,
        lambda r, dist: FeatureCache(tmp_path / "a", "float32").load_or_build(
            encoders[r], ["a single text"], "predict", dist=dist
        ),
    )
    assert not one["errors"] and one["results"][0].shape == one["results"][1].shape == (1, 3, 32)
    empty = _ranks(
        2,
        lambda r, dist: FeatureCache(tmp_path / "b").load_or_build(
            encoders[r], [], "predict", dist=dist
        ),
    )
    assert all("has no texts" in str(e) for e in empty["errors"].values())
    assert len(empty["errors"]) == 2
    # an error on one rank (NaN from rank 1's encoder, in its chunk) is raised on both
    token = encoder.tokenizer.convert_tokens_to_ids("banana")
    with torch.no_grad():
        encoders[1].model.embeddings.word_embeddings.weight[token] = float("nan")
    texts = [*TEXTS[:6], "a banana here", *TEXTS[6:]]
    failed = _ranks(
        2,
        lambda r, dist: FeatureCache(tmp_path / "c", chunk_rows=5).load_or_build(
            encoders[r], texts, "train", dist=dist
        ),
    )
    assert "gave NaN at layer 0 for split 'train', row 6" in str(failed["errors"][1])
    assert str(failed["errors"][0]).startswith("feature extraction failed on rank 1: encoder bert")


def test_nan_from_the_encoder_names_encoder_split_and_row(tmp_path, tiny_models):
    encoder = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16, alias="nanny"))
    token = encoder.tokenizer.convert_tokens_to_ids("banana")
    with torch.no_grad():
        encoder.model.embeddings.word_embeddings.weight[token] = float("nan")
    texts = [*TEXTS[:9], "a banana here", *TEXTS[9:]]
    with pytest.raises(
        FeatureCacheError, match=r"encoder nanny gave NaN at layer 0 for split 'train', row 9"
    ):
        FeatureCache(tmp_path, "float32", chunk_rows=4).load_or_build(encoder, texts, "train")
    assert not _manifests(tmp_path)


def test_float16_overflow_is_stored_in_float32(tmp_path, tiny_models, caplog):
    """A decoder's residual stream beyond float16's range: the chunks that overflow are kept in float32."""
    encoder = FrozenEncoder(EncoderSpec(tiny_models["gpt2"], pooling="mean", max_length=16))
    token = encoder.tokenizer.convert_tokens_to_ids("banana")
    with torch.no_grad():
        encoder.model.wte.weight[token] *= 1e8  # rows with this token exceed 65,504
    texts = [*TEXTS[:9], "a banana here", *TEXTS[9:]]
    with caplog.at_level("INFO"):
        feats = FeatureCache(tmp_path, "float16", chunk_rows=5).load_or_build(
            encoder, texts, "train"
        )
    (manifest,) = _manifests(tmp_path)
    assert manifest["dtype"] == "float32" and manifest["float32_chunks"] == 1
    assert [c["dtype"] for c in manifest["chunks"]] == ["float16", "float32", *["float16"] * 3]
    assert "overflow float16" in caplog.text
    assert feats.dtype == torch.float32 and torch.isfinite(feats[:]).all()
    assert feats[:].abs().max() > 65504
    batch = encoder.tokenizer(texts[:10], padding=True, return_tensors="pt")
    online = encoder(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(feats[5:10], online[5:10], rtol=1e-4, atol=1e-3)


def test_disk_space_is_checked_before_extracting(tmp_path, encoder, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(
        FeatureCacheError, match=r"not enough disk space .* needs 0 MiB, 0 MiB are free"
    ):
        FeatureCache(tmp_path, "float32").load_or_build(encoder, TEXTS, "train")
    assert not list(tmp_path.rglob("*.npy"))


def test_compute_precision_is_part_of_the_key(tmp_path, tiny_models):
    """A bf16 entry is never served to an fp32 request (same weights, texts, everything else)."""
    cache = FeatureCache(tmp_path, "float32")
    bf16 = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16, compute_dtype="bfloat16"))
    fp32 = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16, compute_dtype="float32"))
    low = cache.load_or_build(bf16, TEXTS, "train")[:]
    full = cache.load_or_build(fp32, TEXTS, "train")[:]
    assert cache.last_build_seconds > 0  # extracted again, not read from the bf16 entry
    assert not torch.equal(low, full)
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.05)
    manifests = _manifests(tmp_path)
    assert sorted(m["key"]["compute_dtype"] for m in manifests) == ["bfloat16", "float32"]
    assert all("set in the config" in m["compute_reason"] for m in manifests)


def test_all_layer_entry_serves_any_subset_and_subsets_hold_only_their_layers(tmp_path, encoder):
    cache = FeatureCache(tmp_path / "all", "float32", batch_size=4)
    full = cache.load_or_build(encoder, TEXTS, "train")[:]
    for layers in ([1], [0, 2], [2, -3]):
        part = cache.load_or_build(encoder, TEXTS, "train", layers=layers)
        assert cache.last_build_seconds == 0.0  # read from the all-layer entry, not extracted
        wanted = sorted(i % 3 for i in layers)
        assert part.layers == wanted and torch.equal(part[:], full[:, wanted])
    assert len(_manifests(tmp_path / "all")) == 1

    sub = FeatureCache(tmp_path / "sub", "float32", batch_size=4)
    picked = sub.load_or_build(encoder, TEXTS, "train", layers=[2, 0])
    assert sub.last_build_seconds > 0 and torch.equal(picked[:], full[:, [0, 2]])
    (manifest,) = _manifests(tmp_path / "sub")
    assert manifest["shape"] == [23, 2, 32] and manifest["key"]["layers"] == [0, 2]
    assert sub.entry_dir(manifest["key"]).name.split("-")[-1].startswith("S")
    only_two = sub.load_or_build(encoder, TEXTS, "train", layers=[2])
    assert sub.last_build_seconds == 0.0 and torch.equal(only_two[:], full[:, [2]])
    prefix = sub.load_or_build(encoder, TEXTS, "train", layers=[0, 1])
    assert sub.last_build_seconds > 0  # [0, 2] cannot serve layer 1
    assert torch.equal(prefix[:], full[:, :2])
    assert sorted(
        p.parent.name.split("-")[-1][0] for p in (tmp_path / "sub").rglob("manifest.json")
    ) == [
        "L",
        "S",
    ]


def _fit_module(tmp_path, tiny_models, data_dir, layers, callbacks=(), **trainer_kw):
    import lightning as L

    from layerfusion.data.datamodule import TextClassificationDataModule
    from layerfusion.module import LayerFusionModule

    L.seed_everything(0)
    specs = [EncoderSpec(tiny_models["bert"], max_length=16, alias="bert")]
    dm = TextClassificationDataModule(dataset=str(data_dir), encoders=specs, batch_size=32)
    model = LayerFusionModule(
        specs,
        label_names=dm.label_names,
        layers=layers,
        cache_dir=str(tmp_path / "cache"),
        cache_chunk_rows=64,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **trainer_kw,
    )
    trainer.fit(model, dm)
    return trainer, model, dm


def _cached_layers(root) -> dict[str, list[list[int]]]:
    found: dict[str, list[list[int]]] = {}
    for manifest in _manifests(root):
        found.setdefault(manifest["key"]["split"], []).append(manifest["layers"])
    return {k: sorted(v) for k, v in found.items()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:Found \\d+ module\\(s\\) in eval mode at the start of training")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create")
@pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers")
def test_module_extracts_only_the_selected_layers(tmp_path, tiny_models, sst2_slice):
    """A fixed selection [1] of layers 0..2: train, val and test entries hold layer 1 only; a separate
    `validate --ckpt_path` of a head over [0, 2] extracts exactly those (after the checkpoint is restored,
    not the selection of the config); the cached head equals the online one."""
    trainer, model, dm = _fit_module(tmp_path / "a", tiny_models, sst2_slice, {"bert": [1]})
    trainer.test(model, dm, verbose=False)
    assert _cached_layers(tmp_path / "a") == {"train": [[1]], "val": [[1]], "test": [[1]]}
    assert set(model.extract_seconds) == {"train", "val", "test"}

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    _fit_module(tmp_path / "c", tiny_models, sst2_slice, {"bert": [0, 2]}, [ckpt])
    _, shallow, dm = _fit_module(tmp_path / "d", tiny_models, sst2_slice, {"bert": [1]})
    again = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    metrics = again.validate(shallow, dm, ckpt_path=ckpt.best_model_path, verbose=False)[0]
    assert shallow.selection == {"bert": [0, 2]}
    assert _cached_layers(tmp_path / "d") == {"train": [[1]], "val": [[0, 2], [1]]}
    assert metrics["val_acc"] == pytest.approx(ckpt.best_model_score.item())


def test_leftovers_of_a_host_whose_name_extends_ours_are_not_ours(tmp_path):
    """`node`'s cleanup must not take the temporary files of host `node-<n>` for its own, even when n is
    a dead pid here."""
    import subprocess

    from layerfusion.leftovers import owner_tag, remove_dead_leftovers

    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid
    mine_dead = tmp_path / f".tmp-node-{dead}-a1b2c3d4"
    mine_live = tmp_path / f".tmp-node-{os.getpid()}-a1b2c3d4"
    other_host = tmp_path / f".tmp-node-{dead}-{dead}-a1b2c3d4"  # host node-<dead>, its pid <dead>
    mine_dead.mkdir()
    for f in (mine_live, other_host):
        f.write_text("x")
    assert remove_dead_leftovers(tmp_path, ".tmp-node-") == [mine_dead]
    assert not mine_dead.exists() and mine_live.exists() and other_host.exists()
    assert "@ns" in owner_tag()  # the PID namespace is part of the owner (Linux)


class _PlanSpy:
    """Records the rank (a thread-local set by each rank's thread) of every `_plan` and `_finish` call."""

    def __init__(self, monkeypatch) -> None:
        self.local, self.calls = threading.local(), []
        for name in ("_plan", "_finish"):
            real = getattr(FeatureCache, name)

            def spy(cache, *args, _real=real, _name=name, **kwargs):
                self.calls.append((_name, self.local.rank))
                return _real(cache, *args, **kwargs)

            monkeypatch.setattr(FeatureCache, name, spy)

    def run(self, encoders, root: Path, texts=TEXTS) -> dict:
        def one(r, dist):
            self.local.rank = r
            return FeatureCache(root, "float32", chunk_rows=5).load_or_build(
                encoders[r], texts, "train", dist=dist
            )

        return _ranks(2, one)


def test_rank_0_alone_plans_and_finishes_a_build_a_hit_a_repair_and_a_full_disk(
    tmp_path, encoder, tiny_models, monkeypatch
):
    """DDP: only rank 0 decides (hit or build, chunk layout, disk space, repairing a damaged entry) and
    finishes; the other ranks follow its broadcast. Each case on 2 ranks, with a spy on who planned."""
    encoders = [encoder, FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))]
    single = FeatureCache(tmp_path / "one", "float32", chunk_rows=5).load_or_build(
        encoder, TEXTS, "train"
    )
    spy = _PlanSpy(monkeypatch)
    built = spy.run(encoders, tmp_path / "two")  # a build
    assert not built["errors"] and torch.equal(built["results"][1][:], single[:])
    assert spy.calls == [("_plan", 0), ("_finish", 0)]

    spy.calls.clear()  # a hit
    assert not spy.run(encoders, tmp_path / "two")["errors"]
    assert spy.calls == [("_plan", 0)]

    spy.calls.clear()  # a damaged entry (a chunk file lost): rank 0 repairs it, the ranks rebuild
    sorted((tmp_path / "two").rglob("*.npy"))[0].unlink()
    repaired = spy.run(encoders, tmp_path / "two")
    assert not repaired["errors"] and torch.equal(repaired["results"][1][:], single[:])
    assert spy.calls == [("_plan", 0), ("_finish", 0)]

    spy.calls.clear()  # a full disk: rank 0's check fails, and both ranks raise its message
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    full = spy.run(encoders, tmp_path / "three")
    assert spy.calls == [("_plan", 0)]
    assert len(full["errors"]) == 2
    assert all("not enough disk space" in str(e) for e in full["errors"].values())
