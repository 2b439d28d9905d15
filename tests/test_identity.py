"""The encoder identity stored with a head (checkpoints, classifier folders): weights, depth, tokenizer and
effective max_length; a head is refused on an encoder that differs in any of them, naming what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_threads import build_classifier

from layerfusion import Classifier
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder, encoders_mismatch
from layerfusion.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Hello World, A Gripping FILM", "dull"]


def _copy_model(source: str, target: Path) -> Path:
    """A copy of a model directory (weights linked, not copied: they do not change here)."""
    target.mkdir()
    for f in Path(source).iterdir():
        if f.name == "model.safetensors":
            (target / f.name).symlink_to(f)
        else:
            shutil.copy(f, target / f.name)
    return target


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_tokenizer_without_lowercasing_is_refused_naming_the_encoder(minilm_dir, tmp_path):
    """The issue's case: a copied MiniLM whose tokenizer no longer lowercases (same weights)."""
    copy = _copy_model(minilm_dir, tmp_path / "minilm-copy")
    spec = dict(name=str(copy), alias="minilm", max_length=64, compute_dtype="float32")
    folder = build_classifier([spec], {"minilm": [3, 6]}).save(tmp_path / "clf")
    recorded = json.loads((folder / "classifier.json").read_text())["encoder_ids"]["minilm"]
    assert recorded["max_length"] == 64 and len(recorded["tokenizer_sha256"]) == 64
    before = Classifier.load(folder).predict_proba(TEXTS)

    _edit_json(copy / "tokenizer_config.json", do_lower_case=False)
    encoder = FrozenEncoder(EncoderSpec(**spec))
    assert (
        encoder.tokenizer("Hello")["input_ids"]
        != FrozenEncoder(EncoderSpec(minilm_dir)).tokenizer("Hello")["input_ids"]
    ), "the edit must change the tokens for this test to mean anything"
    assert (
        encoder.fingerprint() == recorded["weights_sha256"]
    )  # same weights: only the tokenizer moved
    with pytest.raises(ConfigError) as err:
        Classifier.load(folder)
    message = str(err.value)
    assert "encoder 'minilm'" in message and str(copy) in message
    assert f"tokenizer SHA-256 {encoder.tokenizer_fingerprint()[:12]}..." in message
    assert f"trained with {recorded['tokenizer_sha256'][:12]}..." in message
    assert "weights" not in message and "max_length" not in message
    # what a checkpoint's module checks on loading (LayerFusionModule.on_load_checkpoint)
    problem = encoders_mismatch({"minilm": recorded}, {"minilm": encoder})
    assert problem and problem.startswith("minilm: tokenizer SHA-256")

    _edit_json(copy / "tokenizer_config.json", do_lower_case=True)
    again = Classifier.load(folder).predict_proba(TEXTS)
    # the same tokenizer again: accepted, the same numbers
    np.testing.assert_allclose(np.asarray(again), np.asarray(before), atol=1e-6, rtol=0)


def test_a_changed_max_length_is_refused_and_old_records_still_load(tiny_models, tmp_path):
    spec = dict(name=tiny_models["bert"], alias="bert", max_length=32, compute_dtype="float32")
    folder = build_classifier([spec], {"bert": [1, 2]}).save(tmp_path / "clf")
    config_path = folder / "classifier.json"
    config = json.loads(config_path.read_text())
    edited = {**config, "encoders": [{**spec, "max_length": 16}]}
    config_path.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match=r"encoder 'bert' .*: max_length 16, trained with 32$"):
        Classifier.load(folder)
    # a folder written before tokenizer and max_length were recorded is checked on what it has
    ids = config["encoder_ids"]["bert"]
    old = {k: ids[k] for k in ("name", "weights_sha256", "layers")}
    config_path.write_text(json.dumps({**config, "encoder_ids": {"bert": old}}))
    assert Classifier.load(folder).encoders["bert"].max_length == 32
    assert encoders_mismatch({"bert": old}, {"other": object()}) is not None  # other encoder keys
