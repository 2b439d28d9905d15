"""FeatureCache: hits, misses on any key change, corrupt/partial entries rebuilt, online == cached."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features.cache import FeatureCache

TEXTS = [f"sentence number {i} " + "word " * (i % 7) for i in range(23)]


@pytest.fixture
def encoder(tiny_models) -> FrozenEncoder:
    return FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))


def test_build_then_hit(tmp_path, encoder):
    cache = FeatureCache(tmp_path, "float32", batch_size=4)
    first = cache.load_or_build(encoder, TEXTS, "train")
    assert first.shape == (23, 3, 32) and cache.last_build_seconds > 0
    again = cache.load_or_build(encoder, TEXTS, "train")
    assert cache.last_build_seconds == 0.0
    assert torch.equal(first, again)
    entries = [p for p in tmp_path.rglob("manifest.json")]
    assert len(entries) == 1
    manifest = json.loads(entries[0].read_text())
    assert (
        manifest["rows"] == 23
        and manifest["shape"] == [23, 3, 32]
        and len(manifest["sha256"]) == 64
    )


def test_cached_features_equal_one_batch_online_forward(tmp_path, encoder):
    feats = FeatureCache(tmp_path, "float32", batch_size=5).load_or_build(encoder, TEXTS, "train")
    batch = encoder.tokenizer(
        TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    online = encoder(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(feats, online, atol=1e-5, rtol=1e-4)
    half = FeatureCache(tmp_path / "h", "float16").load_or_build(encoder, TEXTS, "train")
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), online, atol=2e-2, rtol=1e-2)


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
    assert len(list(tmp_path.rglob("manifest.json"))) == 2


def test_changed_weights_are_a_new_entry(tmp_path, encoder, tiny_models):
    cache = FeatureCache(tmp_path, "float32")
    k1 = cache.key(encoder, TEXTS, "train")
    other = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))
    with torch.no_grad():
        other.model.encoder.layer[0].output.dense.bias.add_(0.5)
    assert cache.key(other, TEXTS, "train")["weights_sha256"] != k1["weights_sha256"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "no_manifest"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, encoder, caplog, damage):
    cache = FeatureCache(tmp_path, "float32")
    good = cache.load_or_build(encoder, TEXTS, "train").clone()
    entry = cache.entry_dir(cache.key(encoder, TEXTS, "train"))
    array = entry / "features.npy"
    if damage == "truncate":
        array.write_bytes(array.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(array.read_bytes())
        data[-5] ^= 0xFF
        array.write_bytes(bytes(data))
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{not json")
    else:
        (entry / "manifest.json").unlink()
    with caplog.at_level("WARNING"):
        rebuilt = cache.load_or_build(encoder, TEXTS, "train")
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert cache.last_build_seconds > 0
    assert torch.equal(rebuilt, good)


def test_interrupted_build_leaves_no_entry(tmp_path, encoder, monkeypatch):
    import layerfusion.features.cache as cache_mod

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    cache = FeatureCache(tmp_path, "float32")
    monkeypatch.setattr(cache_mod, "file_sha256", boom)  # dies after the array is written
    with pytest.raises(KeyboardInterrupt):
        cache.load_or_build(encoder, TEXTS, "train")
    assert not list(tmp_path.rglob("features.npy"))
    monkeypatch.undo()
    assert cache.load_or_build(encoder, TEXTS, "train").shape[0] == 23


def test_length_sorted_extraction_restores_row_order(tmp_path, encoder):
    texts = ["short", "a much much longer text with many many tokens in it", "mid sized text"]
    feats = FeatureCache(tmp_path, "float32", batch_size=1).load_or_build(encoder, texts, "x")
    for i, t in enumerate(texts):
        b = encoder.tokenizer([t], return_tensors="pt")
        np.testing.assert_allclose(
            feats[i].numpy(), encoder(b["input_ids"], b["attention_mask"])[0].numpy(), atol=1e-5
        )


def test_sharded_build_equals_single_process_build(tmp_path, encoder, tiny_models):
    """Two ranks (threads here, each with its own encoder, sharing a real barrier) extract half
    each; rank 0 merges."""
    import threading

    single = FeatureCache(tmp_path / "one", "float32").load_or_build(encoder, TEXTS, "train")
    cache = FeatureCache(tmp_path / "two", "float32", batch_size=4)
    encoders = [encoder, FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16))]
    gate = threading.Barrier(2, timeout=60)
    results: dict[int, torch.Tensor] = {}

    def rank(r: int) -> None:
        results[r] = cache.load_or_build(
            encoders[r], TEXTS, "train", shard=(r, 2), barrier=gate.wait
        )

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {0, 1}
    torch.testing.assert_close(results[0], single, atol=1e-5, rtol=1e-4)
    assert torch.equal(results[0], results[1])
    assert not list((tmp_path / "two").rglob("*part*"))  # parts merged and removed
    assert len(list((tmp_path / "two").rglob("manifest.json"))) == 1


def test_compute_precision_is_part_of_the_key(tmp_path, tiny_models):
    """A bf16 entry is never served to an fp32 request (same weights, texts, everything else)."""
    cache = FeatureCache(tmp_path, "float32")
    bf16 = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16, compute_dtype="bfloat16"))
    fp32 = FrozenEncoder(EncoderSpec(tiny_models["bert"], max_length=16, compute_dtype="float32"))
    low = cache.load_or_build(bf16, TEXTS, "train")
    full = cache.load_or_build(fp32, TEXTS, "train")
    assert cache.last_build_seconds > 0  # extracted again, not read from the bf16 entry
    assert not torch.equal(low, full)
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.05)
    manifests = [json.loads(p.read_text()) for p in tmp_path.rglob("manifest.json")]
    assert sorted(m["key"]["compute_dtype"] for m in manifests) == ["bfloat16", "float32"]
    assert all("set in the config" in m["compute_reason"] for m in manifests)


def test_entry_with_more_layers_serves_fewer_and_fewer_never_serve_more(tmp_path, encoder):
    cache = FeatureCache(tmp_path / "deep", "float32", batch_size=4)
    full = cache.load_or_build(encoder, TEXTS, "train").clone()
    part = cache.load_or_build(encoder, TEXTS, "train", depth=1)
    assert cache.last_build_seconds == 0.0  # sliced from the all-layer entry, not extracted
    assert part.shape == (23, 2, 32) and torch.equal(part, full[:, :2])
    assert len(list((tmp_path / "deep").rglob("manifest.json"))) == 1

    shallow_cache = FeatureCache(tmp_path / "shallow", "float32", batch_size=4)
    shallow = shallow_cache.load_or_build(encoder, TEXTS, "train", depth=1)
    assert shallow_cache.last_build_seconds > 0 and torch.equal(shallow, full[:, :2])
    (manifest,) = [json.loads(p.read_text()) for p in (tmp_path / "shallow").rglob("manifest.json")]
    assert manifest["shape"] == [23, 2, 32] and manifest["key"]["layers"] == 2
    deep = shallow_cache.load_or_build(encoder, TEXTS, "train")
    assert shallow_cache.last_build_seconds > 0  # two layers cannot serve three
    assert torch.equal(deep, full)


def _fit_module(tmp_path, tiny_models, data_dir, layers, callbacks=(), **trainer_kw):
    import lightning as L

    from layerfusion.data.datamodule import TextClassificationDataModule
    from layerfusion.module import LayerFusionModule

    L.seed_everything(0)
    specs = [EncoderSpec(tiny_models["bert"], max_length=16, alias="bert")]
    dm = TextClassificationDataModule(dataset=str(data_dir), encoders=specs, batch_size=32)
    model = LayerFusionModule(
        specs, label_names=dm.label_names, layers=layers, cache_dir=str(tmp_path / "cache")
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


def _cached_layer_counts(root) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = {}
    for p in sorted(root.rglob("manifest.json")):
        key = json.loads(p.read_text())["key"]
        counts.setdefault(key["split"], []).append(key["layers"])
    return counts


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:Found \\d+ module\\(s\\) in eval mode at the start of training")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create")
def test_module_extracts_up_to_the_deepest_selected_layer(tmp_path, tiny_models, sst2_slice):
    """A fixed selection ending at layer 1 of 0..2: train/val/test stop there; LayerImportance (which
    scores every layer) gets all layers of train/val; a checkpoint restoring a deeper selection after
    setup gets the missing layers extracted."""
    from layerfusion.callbacks import LayerImportance

    trainer, model, dm = _fit_module(tmp_path / "a", tiny_models, sst2_slice, {"bert": [1]})
    trainer.test(model, dm, verbose=False)
    assert _cached_layer_counts(tmp_path / "a") == {"train": [2], "val": [2], "test": [2]}

    scoring = LayerImportance(attention_samples=0, max_iter=5, dirpath=str(tmp_path / "imp"))
    trainer, model, dm = _fit_module(
        tmp_path / "b", tiny_models, sst2_slice, {"bert": [1]}, [scoring]
    )
    assert [(r.encoder, r.layer) for r in scoring.table] == [("bert", i) for i in range(3)]
    trainer.test(model, dm, verbose=False)
    assert _cached_layer_counts(tmp_path / "b") == {"train": [3], "val": [3], "test": [2]}

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    _fit_module(tmp_path / "c", tiny_models, sst2_slice, {"bert": [0, 2]}, [ckpt])
    _, shallow, dm = _fit_module(tmp_path / "d", tiny_models, sst2_slice, {"bert": [1]})
    again = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    metrics = again.validate(shallow, dm, ckpt_path=ckpt.best_model_path, verbose=False)[0]
    assert shallow.selection == {"bert": [0, 2]}
    assert _cached_layer_counts(tmp_path / "d") == {"train": [2], "val": [2, 3]}
    assert metrics["val_acc"] == pytest.approx(ckpt.best_model_score.item())
