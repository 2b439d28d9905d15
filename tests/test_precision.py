"""Mixed precision on a real encoder and real data: bf16-mixed agrees with fp32; bf16 encoders halve memory."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import MINILM

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.module import LayerFusionModule

pytestmark = pytest.mark.slow


def _trainer(tmp_path, precision: str) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_bf16_mixed_agrees_with_fp32_on_real_sst2(tmp_path, shared_data):
    L.seed_everything(0)
    specs = [EncoderSpec(MINILM, max_length=64)]
    dm = TextClassificationDataModule(
        "sst2",
        data_dir=str(shared_data),
        encoders=specs,
        max_train_samples=800,
        max_eval_samples=400,
    )
    model = LayerFusionModule(specs, label_names=dm.label_names, cache_dir=str(tmp_path / "cache"))
    _trainer(tmp_path, "32-true").fit(model, dm)

    preds = {}
    for precision in ("32-true", "bf16-mixed"):
        out = _trainer(tmp_path, precision).predict(model, dm)
        preds[precision] = torch.cat([o["probs"] for o in out]).argmax(-1)
    assert len(preds["32-true"]) == 400
    agreement = (preds["32-true"] == preds["bf16-mixed"]).float().mean().item()
    assert agreement >= 0.99, agreement

    # and bf16-mixed trains end to end on the same data
    bf16 = LayerFusionModule(specs, label_names=dm.label_names, cache_dir=str(tmp_path / "cache"))
    trainer = _trainer(tmp_path, "bf16-mixed")
    trainer.fit(bf16, dm)
    assert trainer.callback_metrics["val_acc"] > 0.7


def test_encoder_in_bf16_halves_its_memory_and_keeps_predictions(tmp_path, shared_data):
    from layerfusion.encoders.frozen import FrozenEncoder
    from layerfusion.features.cache import FeatureCache

    texts = TextClassificationDataModule("sst2", data_dir=str(shared_data), max_eval_samples=64)
    texts.setup("validate")
    rows = texts.texts("val")
    fp32 = FrozenEncoder(EncoderSpec(MINILM, max_length=64))
    bf16 = FrozenEncoder(EncoderSpec(MINILM, max_length=64, torch_dtype="bfloat16"))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    ratio = bf16.model.get_memory_footprint() / fp32.model.get_memory_footprint()
    assert 0.49 < ratio < 0.51, ratio
    cache = FeatureCache(tmp_path, "float32")
    a, b = cache.load_or_build(fp32, rows, "val"), cache.load_or_build(bf16, rows, "val")
    assert cache.entry_dir(cache.key(fp32, rows, "val")) != cache.entry_dir(
        cache.key(bf16, rows, "val")
    )
    cos = torch.nn.functional.cosine_similarity(a[:, -1], b[:, -1], dim=-1)
    assert cos.min() > 0.99, cos.min()  # last-layer features barely move in bf16
