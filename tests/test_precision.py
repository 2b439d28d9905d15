"""Compute precision on a real encoder and real data: the encoder itself runs in bf16 and its features
and predictions match fp32; bf16 weights halve the encoder's memory."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import MINILM

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features.cache import FeatureCache
from layerfusion.module import LayerFusionModule

pytestmark = pytest.mark.slow


def _trainer(tmp_path, precision: str) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def _dev_texts(shared_data, n: int) -> list[str]:
    dm = TextClassificationDataModule("sst2", data_dir=str(shared_data), max_eval_samples=n)
    dm.setup("validate")
    return dm.texts("val")


def test_bf16_extraction_matches_fp32_per_layer_on_real_sst2(tmp_path, shared_data):
    """The parity test of `compute_dtype`: every layer of real MiniLM on real SST-2 dev sentences, the
    encoder computing in bf16 (autocast) against fp32: cosine >= 0.999 for every row and layer."""
    rows = _dev_texts(shared_data, 96)
    cache = FeatureCache(tmp_path, "float32", batch_size=32)
    encoders = {
        dtype: FrozenEncoder(EncoderSpec(MINILM, max_length=64, compute_dtype=dtype))
        for dtype in ("float32", "bfloat16")
    }
    feats = {dtype: cache.load_or_build(enc, rows, "val")[:] for dtype, enc in encoders.items()}
    assert feats["float32"].shape == (96, 7, 384)
    assert not torch.equal(feats["float32"], feats["bfloat16"])  # bf16 really ran
    cos = torch.nn.functional.cosine_similarity(feats["float32"], feats["bfloat16"], dim=-1)
    worst = cos.min(dim=0).values  # per layer, the least similar row
    assert (worst >= 0.999).all(), worst.tolist()
    keys = sorted(
        json.loads(p.read_text())["key"]["compute_dtype"] for p in tmp_path.rglob("manifest.json")
    )
    assert keys == [
        "bfloat16",
        "float32",
    ]  # two entries: bf16 features never stand in for fp32 ones


def test_head_trained_on_fp32_features_predicts_the_same_with_a_bf16_encoder(tmp_path, shared_data):
    """Train the head on fp32 features, then predict with the encoder running online with
    `compute_dtype=bfloat16` under a 32-true trainer (so only the encoder's own setting makes it bf16):
    predictions agree with fp32. And a float32 encoder stays fp32 under a bf16-mixed trainer."""
    L.seed_everything(0)
    dm_args = dict(data_dir=str(shared_data), max_train_samples=300, max_eval_samples=96)
    fp32_spec = [EncoderSpec(MINILM, max_length=64, compute_dtype="float32")]
    dm = TextClassificationDataModule("sst2", encoders=fp32_spec, **dm_args)
    model = LayerFusionModule(fp32_spec, label_names=dm.label_names, cache_dir=str(tmp_path / "c"))
    trainer = _trainer(tmp_path, "32-true")
    trainer.fit(model, dm)
    assert trainer.callback_metrics["val_acc"] > 0.7
    fp32 = torch.cat([o["probs"] for o in _trainer(tmp_path, "32-true").predict(model, dm)])

    def run_online(compute_dtype: str, precision: str) -> tuple[torch.Tensor, set]:
        spec = [EncoderSpec(MINILM, max_length=64, compute_dtype=compute_dtype)]
        online = TextClassificationDataModule("sst2", encoders=spec, features="online", **dm_args)
        module = LayerFusionModule(
            spec, label_names=dm.label_names, features="online", cache_dir=str(tmp_path / "c")
        )
        module.load_state_dict(model.state_dict())
        seen = set()
        query = module.encoders[spec[0].key].model.encoder.layer[-1].attention.self.query
        query.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
        out = _trainer(tmp_path, precision).predict(module, online)
        return torch.cat([o["probs"] for o in out]), seen

    bf16, seen = run_online("bfloat16", "32-true")
    assert seen == {torch.bfloat16}  # the encoder itself ran in bf16
    assert len(fp32) == len(bf16) == 96
    agreement = (fp32.argmax(-1) == bf16.argmax(-1)).float().mean().item()
    assert agreement >= 0.98, agreement
    assert (fp32 - bf16.float()).abs().max() < 0.1
    shielded, seen = run_online("float32", "bf16-mixed")
    assert seen == {torch.float32}  # the trainer's autocast does not reach a float32 encoder
    # the head itself runs under the trainer's bf16 autocast: its probabilities move by bf16 rounding
    # only (measured 1e-3; a row on the decision boundary may flip its argmax)
    shift = (shielded.float() - fp32).abs().max().item()
    assert shift < 0.01, shift


def test_encoder_in_bf16_halves_its_memory_and_keeps_predictions(tmp_path, shared_data):
    rows = _dev_texts(shared_data, 32)
    fp32 = FrozenEncoder(EncoderSpec(MINILM, max_length=64))
    bf16 = FrozenEncoder(EncoderSpec(MINILM, max_length=64, torch_dtype="bfloat16"))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    ratio = bf16.model.get_memory_footprint() / fp32.model.get_memory_footprint()
    assert 0.49 < ratio < 0.51, ratio
    cache = FeatureCache(tmp_path, "float32")
    a, b = cache.load_or_build(fp32, rows, "val")[:], cache.load_or_build(bf16, rows, "val")[:]
    assert cache.entry_dir(cache.key(fp32, rows, "val")) != cache.entry_dir(
        cache.key(bf16, rows, "val")
    )
    cos = torch.nn.functional.cosine_similarity(a[:, -1], b[:, -1], dim=-1)
    assert cos.min() > 0.99, cos.min()  # last-layer features barely move in bf16
