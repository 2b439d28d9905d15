"""`Classifier`: a real fit checkpoint of tiny encoders, predictions equal to the module's, save/load
without pickle, early exit, the `classify` command, and the errors for files that are not checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from layerfusion import Classifier
from layerfusion.__main__ import main
from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import CheckpointError, ConfigError
from layerfusion.module import LayerFusionModule

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a gripping, beautifully acted film", "dull", "so-so", "it is what it is . " * 20]
LAYERS = {"bert": [0, 2], "gpt2": [1]}  # gpt2 has hidden states 0..2: layer 1 is an early exit


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, shared_data):
    """A gated head over two tiny encoders fitted for 2 epochs on SST-2 rows: (checkpoint, model, dm)."""
    d = tmp_path_factory.mktemp("classifier")
    data = d / "data"
    data.mkdir()
    for split, n in (("train", 120), ("dev", 40), ("test", 40)):
        lines = (shared_data / "sst2" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        (data / f"{split}.jsonl").write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    specs = [
        # fp32: predictions are compared across batch sizes (bf16 results depend on the padding)
        EncoderSpec(tiny_models["bert"], max_length=32, alias="bert", compute_dtype="float32"),
        EncoderSpec(
            tiny_models["gpt2"],
            pooling="last",
            max_length=32,
            alias="gpt2",
            compute_dtype="float32",
        ),
    ]
    L.seed_everything(0)
    dm = TextClassificationDataModule(dataset=str(data), encoders=specs, batch_size=16)
    model = LayerFusionModule(
        specs,
        dm.label_names,
        layers=LAYERS,
        hidden=16,
        cache_dir=str(d / "cache"),
        cache_dtype="float32",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=d,
        callbacks=[
            ModelCheckpoint(dirpath=d / "ckpt", filename="best", monitor="val_acc", mode="max")
        ],
    )
    trainer.fit(model, dm)
    return d / "ckpt" / "best.ckpt", model, dm


def test_predictions_equal_the_modules_own(trained):
    ckpt, model, dm = trained
    clf = Classifier.from_checkpoint(ckpt, device="cpu", batch_size=3)
    restored = LayerFusionModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    restored.eval()
    dm.setup("test")
    texts = dm.texts("test")
    with torch.no_grad():
        feats = {k: enc(**_tokens(enc, texts)) for k, enc in restored.encoders.items()}
        expected = torch.softmax(restored(feats), dim=-1)
    probs = torch.from_numpy(clf.predict_proba(texts))
    assert clf.layers == LAYERS and clf.label_names == ["0", "1"]
    assert torch.allclose(probs, expected, atol=1e-5), (probs - expected).abs().max()
    labels = [clf.label_names[i] for i in expected.argmax(-1).tolist()]
    assert clf.predict(texts).tolist() == labels
    rows = clf.predict_dicts(texts)
    assert [r["label"] for r in rows] == labels
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in rows)


def test_encoders_stop_at_the_deepest_selected_layer(trained):
    clf = Classifier.from_checkpoint(trained[0], device="cpu")
    gpt2 = clf.encoders["gpt2"].model
    ran = []
    hooks = [
        gpt2.h[i].register_forward_hook(lambda *_, i=i: ran.append(i)) for i in range(len(gpt2.h))
    ]
    try:
        clf.predict(TEXTS[:2])
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0], f"gpt2 blocks run: {ran}; layer 1 is the deepest the head reads"


def test_save_and_load_round_trip_without_pickle(trained, tmp_path, monkeypatch):
    clf = Classifier.from_checkpoint(trained[0], device="cpu")
    out = clf.save(tmp_path / "clf")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "classifier.json",
        "head.safetensors",
    ]
    config = json.loads((out / "classifier.json").read_text())
    assert config["head"] == "gated" and config["head_args"] == {"hidden": 16, "dropout": 0.1}
    assert config["layers"] == LAYERS and config["label_names"] == ["0", "1"]
    assert [e["alias"] for e in config["encoders"]] == ["bert", "gpt2"]
    head = load_file(out / "head.safetensors")
    assert all(torch.equal(head[k], v) for k, v in clf.head.state_dict().items())
    card = (out / "README.md").read_text()
    assert "`gated` fusion head" in card and "| `gpt2` |" in card and "Classifier.load" in card

    def no_pickle(*args, **kwargs):
        raise AssertionError("Classifier.load must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = Classifier.load(out, device="cpu")
    assert np.array_equal(loaded.predict_proba(TEXTS), clf.predict_proba(TEXTS))


def test_compute_dtype_and_batch_size(trained):
    fp32 = Classifier.from_checkpoint(trained[0], device="cpu", compute_dtype="float32")
    bf16 = Classifier.from_checkpoint(
        trained[0], device="cpu", compute_dtype="bfloat16", batch_size=1
    )
    assert {k: e.compute_precision("cpu") for k, e in bf16.encoders.items()} == {
        "bert": "bfloat16",
        "gpt2": "bfloat16",
    }
    a, b = fp32.predict_proba(TEXTS), bf16.predict_proba(TEXTS)
    assert not np.array_equal(a, b), "bf16 changes the encoder's numbers"
    assert np.allclose(a, b, atol=0.05)


def test_encoder_weights_must_match_the_training_ones(trained, tmp_path):
    out = Classifier.from_checkpoint(trained[0], device="cpu").save(tmp_path / "clf")
    config = json.loads((out / "classifier.json").read_text())
    config["encoder_ids"]["gpt2"]["weights_sha256"] = "0" * 64
    (out / "classifier.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match="encoder 'gpt2' .* is not the one this head was trained on"
    ):
        Classifier.load(out)


@pytest.fixture(scope="module")
def boring(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of another program's model (Lightning's BoringModel)."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    root = tmp_path_factory.mktemp("boring")
    L.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    ).fit(BoringModel())
    (path,) = root.rglob("*.ckpt")
    return path


def test_not_a_checkpoint_is_one_clear_error(boring, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    cases = {
        tmp_path / "missing.ckpt": "not found",
        text: "is not a layerfusion checkpoint: torch.load cannot read it",
        plain: "was not written by layerfusion: a PyTorch file from another program",
        boring: "was not written by layerfusion: a Lightning checkpoint of another model",
        tmp_path: "is a directory, not a checkpoint file",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError) as err:
            Classifier.from_checkpoint(path)
        assert str(path) in str(err.value) and message in str(err.value)
    with pytest.raises(CheckpointError, match="no classifier.json"):
        Classifier.load(tmp_path)


@pytest.mark.parametrize("what", ["missing", "text", "boring"])
def test_cli_ckpt_path_errors_are_one_line(
    what, boring, tiny_models, tmp_path, capsys, monkeypatch
):
    """`test --ckpt_path` with a bad file: one `layerfusion: error:` line, before any encoder loads."""
    monkeypatch.setattr("sys.argv", ["layerfusion"])  # the CLI's arguments: `argv` below
    monkeypatch.chdir(tmp_path)  # the config's relative run paths
    path = boring if what == "boring" else tmp_path / "x.ckpt"
    if what == "text":
        path.write_text("hello\n")
    # a tiny encoder and no logger: were the check gone, the run would still be cheap and local
    tiny = json.dumps([{"name": tiny_models["bert"], "alias": "bert"}])
    argv = ["test", "--config", str(REPO / "configs" / "quickstart.yaml"), "--ckpt_path", str(path)]
    argv += ["--model.encoders", tiny, "--trainer.logger", "false", "--data.max_eval_samples", "8"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("layerfusion: error: ") and str(path) in err[0], err


def test_classify_command(trained, tmp_path, capsys):
    out = Classifier.from_checkpoint(trained[0], device="cpu").save(tmp_path / "clf")
    expected = Classifier.load(out, device="cpu").predict_dicts(["good", "bad", "so so"])
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes('\ufeff{"text": "bad"}\n\n{"text": "so so", "id": 3}\n'.encode())
    for model in (out, trained[0]):  # a saved folder and a checkpoint
        with pytest.raises(SystemExit) as exit_:
            main(["classify", str(model), "good", "--file", str(jsonl), "--device", "cpu"])
        assert exit_.value.code == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["text"] for r in rows] == ["good", "bad", "so so"]
        assert [r["label"] for r in rows] == [e["label"] for e in expected]
        for row, exp in zip(rows, expected, strict=True):
            assert row["probs"] == pytest.approx(exp["probs"], abs=1e-6)
    lines = tmp_path / "in.txt"
    lines.write_text("good\n\nbad\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["classify", str(out), "--file", str(lines)])
    assert [json.loads(x)["text"] for x in capsys.readouterr().out.splitlines()] == ["good", "bad"]

    jsonl.write_text('{"text": "fine"}\n{"txt": "typo"}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["classify", str(out), "--file", str(jsonl)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert err == f"layerfusion: error: {jsonl}:2: missing field 'text' (keys present: ['txt'])"


def _tokens(encoder, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = encoder.tokenizer(
        texts, truncation=True, max_length=encoder.max_length, padding=True, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
