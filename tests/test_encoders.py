"""FrozenEncoder + LayerTaps on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS

from layerfusion.encoders.frozen import (
    EncoderSpec,
    FrozenEncoder,
    clamp_max_length,
    load_pretrained,
    tap_modules,
)
from layerfusion.encoders.taps import pool
from layerfusion.errors import ConfigError

TEXTS = [
    "a short one .",
    "a rather longer sentence that needs more tokens than the first one does",
    "mid length text here",
]


def _encoder(path: str, pooling: str = "mean", **kw) -> FrozenEncoder:
    return FrozenEncoder(EncoderSpec(name=path, pooling=pooling, **kw))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_taps_equal_pooled_output_hidden_states(tiny_models, arch, pooling):
    enc = _encoder(tiny_models[arch], pooling)
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0, (
        "the batch must contain padding for this test to mean anything"
    )
    tapped = enc(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = enc.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
    assert tapped.shape == (len(TEXTS), len(ref), enc.hidden_size)
    assert enc.num_layers == len(ref) == 3  # embeddings + 2 blocks
    for i, h in enumerate(ref):
        torch.testing.assert_close(
            tapped[:, i], pool(h, batch["attention_mask"], pooling), atol=1e-5, rtol=0
        )


def test_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))
    left = torch.tensor(
        [[0, 1, 1], [1, 1, 1]]
    )  # left padding: last token is still the last real one
    torch.testing.assert_close(pool(hidden, left, "last"), torch.tensor([[4.0, 5.0], [10.0, 11.0]]))


def test_encoder_is_frozen_and_stays_in_eval(tiny_models):
    enc = _encoder(tiny_models["bert"])
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training and not any(m.training for m in enc.model.modules())
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    out = enc(batch["input_ids"], batch["attention_mask"])
    assert not out.requires_grad
    assert all(p.grad is None for p in enc.parameters())


def test_hooks_removed_on_close(tiny_models):
    enc = _encoder(tiny_models["roberta"])
    modules = tap_modules(enc.model)
    assert all(len(m._forward_hooks) == 1 for m in modules)
    enc.close()
    assert all(len(m._forward_hooks) == 0 for m in modules)
    assert not enc.taps.active


def test_taps_ignore_forward_without_start(tiny_models):
    enc = _encoder(tiny_models["bert"])
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        enc.model(**batch)  # a plain forward, taps not armed
    with pytest.raises(RuntimeError, match="did not fire"):
        enc.taps.stack()


def test_max_length_is_clamped_with_a_warning(tiny_models, caplog):
    model, tok = load_pretrained(EncoderSpec(tiny_models["bert"]))
    spec = EncoderSpec(tiny_models["bert"], max_length=100_000)
    with caplog.at_level("WARNING"):
        assert clamp_max_length(spec, tok, model.config) == 512
    assert "clamped to 512" in caplog.text
    roberta, rtok = load_pretrained(EncoderSpec(tiny_models["roberta"]))
    # RoBERTa positions start after padding_idx (here 0): 512 position embeddings hold 511 tokens
    assert clamp_max_length(EncoderSpec("r", max_length=10_000), rtok, roberta.config) == 511
    with pytest.raises(ConfigError, match="max_length"):
        clamp_max_length(EncoderSpec("x", max_length=0), tok, model.config)


def test_unsupported_architecture_is_named():
    from transformers import AutoModel, T5Config

    model = AutoModel.from_config(
        T5Config(vocab_size=50, d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8)
    )
    with pytest.raises(ConfigError, match="unsupported encoder architecture 't5'.*supported: bert"):
        tap_modules(model)


def test_fingerprint_tracks_weights(tiny_models):
    a, b = _encoder(tiny_models["bert"]), _encoder(tiny_models["bert"])
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.model.embeddings.word_embeddings.weight[0, 0] += 1.0
    b._fingerprint = None
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() != _encoder(tiny_models["roberta"]).fingerprint()
