"""`Classifier`: a real fit checkpoint of tiny encoders, predictions equal to the module's, save/load
without pickle, early exit, the `classify` command, and the errors for files that are not checkpoints."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, tiny_pair_specs
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from layerfusion import Classifier
from layerfusion.__main__ import main
from layerfusion.classifier import BLOCK_ROWS
from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import CheckpointError, ConfigError, LayerFusionError
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
    specs = tiny_pair_specs(tiny_models)  # fp32: predictions are compared across batch sizes
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
    assert err == (
        f"layerfusion: error: {jsonl}:2: missing field 'text' (keys present: ['txt']); "
        "name the text field (--text-field)"
    )


def _tokens(encoder, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = encoder.tokenizer(
        texts, truncation=True, max_length=encoder.max_length, padding=True, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# -- the APIs users know (issue 28, item 11) ------------------------------------------------------


def test_sklearn_pipeline_and_encode_styles(trained, tiny_models):
    """`predict`/`predict_proba`/`classes_` as scikit-learn, `clf(texts, top_k=)` shaped exactly as a real
    transformers text-classification pipeline, `encode` giving what the head's final layer reads."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    clf = Classifier.from_checkpoint(trained[0], device="cpu")
    proba = clf.predict_proba(TEXTS)
    assert isinstance(proba, np.ndarray) and proba.dtype == np.float32 and proba.shape == (4, 2)
    assert np.allclose(proba.sum(1), 1, atol=1e-6)
    assert isinstance(clf.classes_, np.ndarray) and clf.classes_.tolist() == ["0", "1"]
    labels = clf.predict(TEXTS)
    assert (
        isinstance(labels, np.ndarray) and labels.tolist() == clf.classes_[proba.argmax(1)].tolist()
    )

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    pipe = pipeline(
        "text-classification",
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(tiny_models["bert"]),
    )
    calls = [
        ("dull", {}),
        (TEXTS[:2], {}),
        ("dull", {"top_k": 2}),
        (TEXTS[:2], {"top_k": None}),
        (TEXTS[:2], {"top_k": 1}),
    ]
    for texts, kwargs in calls:
        assert _shape(clf(texts, **kwargs)) == _shape(pipe(texts, **kwargs)), (texts, kwargs)
    assert clf(TEXTS) == [
        {"label": lab, "score": pytest.approx(float(p.max()))} for lab, p in zip(labels, proba)
    ]
    ranked = clf(TEXTS, top_k=None)
    assert [[d["label"] for d in r] for r in ranked] == [
        clf.classes_[np.argsort(-p)].tolist() for p in proba
    ]
    assert all(r[0]["score"] >= r[1]["score"] for r in ranked)

    fused = clf.encode(TEXTS)
    assert fused.shape == (4, 16)  # the gated head's hidden width
    logits = clf.head.classifier(torch.from_numpy(fused))
    assert np.allclose(torch.softmax(logits, -1).detach().numpy(), proba, atol=1e-5)
    assert np.allclose(clf.encode(TEXTS[2]), fused[2], atol=1e-5)  # one string: one vector
    assert np.allclose(np.linalg.norm(clf.encode(TEXTS, normalize_embeddings=True), axis=1), 1)
    layers = clf.encode(TEXTS, output_value="layers")
    bert = clf.encoders["bert"]
    assert {k: v.shape for k, v in layers.items()} == {"bert": (4, 2, 32), "gpt2": (4, 1, 32)}
    with torch.no_grad():
        alone = bert(**_tokens(bert, [TEXTS[1]]))[:, LAYERS["bert"]]
    assert np.allclose(layers["bert"][1], alone[0].numpy(), atol=1e-5)


def test_token_budget_batching_and_progress_bar(trained, capsys):
    """Forward passes are bounded by padded tokens (short texts batch more rows), results do not depend
    on the batching, and a progress bar shows on long inputs only."""
    clf = Classifier.from_checkpoint(trained[0], device="cpu", token_budget=64)
    shapes = []
    clf.encoders["bert"].register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    texts = ["good"] * 40 + [TEXTS[3]] * 4 + ["a fine film , well acted"] * 6
    probs = clf.predict_proba(texts)
    assert sum(r for r, _ in shapes) == len(texts)
    assert all(r * w <= 64 or r == 1 for r, w in shapes), shapes
    assert len({r for r, _ in shapes}) > 1, shapes  # rows per pass follow the lengths
    one_by_one = Classifier.from_checkpoint(
        trained[0], device="cpu", token_budget=None, batch_size=1
    )
    assert np.allclose(probs, one_by_one.predict_proba(texts), atol=1e-5)
    capsys.readouterr()

    short = Classifier.from_checkpoint(trained[0], device="cpu")
    short.predict(["good"] * 10)
    assert "classify" not in capsys.readouterr().err
    short.predict(["good"] * 1000)
    assert "classify: 100%" in capsys.readouterr().err
    short.progress_bar = False
    short.predict(["good"] * 1000)
    assert "classify" not in capsys.readouterr().err


# -- answers users can act on (item 10) ------------------------------------------------------------


def test_blank_texts_single_strings_and_non_finite_features(trained, tiny_models, tmp_path, capsys):
    from layerfusion.classifier import InputError
    from layerfusion.encoders.frozen import FrozenEncoder

    clf = Classifier.from_checkpoint(trained[0], device="cpu")
    for call in (clf.predict, clf.predict_proba, clf, clf.encode, clf.predict_dicts):
        with pytest.raises(InputError, match=r"texts\[1\] is whitespace only"):
            call(["fine", " \t\n"])
        with pytest.raises(InputError, match=r"texts\[0\] is empty"):
            call("")
    assert clf.predict("so-so").tolist() == clf.predict(["so-so"]).tolist()
    assert clf.predict_proba("so-so").shape == (1, 2)
    assert clf("so-so") == clf(["so-so"]) and len(clf.predict_dicts("so-so")) == 1

    # an encoder whose embedding of one token (in "dull") is infinite: its features are NaN
    token = clf.encoders["bert"].tokenizer("dull")["input_ids"][1]
    with torch.no_grad():
        clf.encoders["bert"].model.embeddings.word_embeddings.weight[token] = float("inf")
    with pytest.raises(
        LayerFusionError, match=r"encoder bert gave NaN at layer \d+ for texts\[1\]"
    ):
        clf.predict_proba(["fine", "dull"])

    # the same encoder on disk, behind a saved classifier: `classify` stops with one line, no NaN JSON
    out = Classifier.from_checkpoint(trained[0], device="cpu").save(tmp_path / "clf")
    poisoned = tmp_path / "bert-inf"
    shutil.copytree(tiny_models["bert"], poisoned)
    weights = load_file(poisoned / "model.safetensors")
    (name,) = [k for k in weights if k.endswith("word_embeddings.weight")]
    weights[name][token] = float("inf")
    save_file(weights, poisoned / "model.safetensors", {"format": "pt"})
    config = json.loads((out / "classifier.json").read_text())
    config["encoders"][0]["name"] = str(poisoned)
    spec = EncoderSpec(**config["encoders"][0])
    config["encoder_ids"]["bert"]["weights_sha256"] = FrozenEncoder(spec).fingerprint()
    (out / "classifier.json").write_text(json.dumps(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["classify", str(out), "fine", "dull", "--device", "cpu"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and "NaN" not in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "gave NaN" in err[0] and "for argument 2" in err[0], err


# -- classify --file (item 9) -----------------------------------------------------------------------


def test_classify_reads_files_as_training_does(trained, tmp_path, capsys):
    """CSV (quoted commas and newlines, renamed column), TSV, JSON array, gzipped JSON Lines, Parquet and
    .txt give the file's texts, labelled as `predict` labels them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Classifier.from_checkpoint(trained[0], device="cpu").save(tmp_path / "clf")
    clf = Classifier.load(out, device="cpu")
    texts = ["good, really good", 'a "quoted" word', "two\nlines", "bad"]
    plain = ["good", "so so", "bad"]  # TSV and .txt: no tabs, quotes or newlines in a cell
    files = {}
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "review", "label"])
        writer.writerows([i, t, "x"] for i, t in enumerate(texts))
    files["in.csv"] = texts
    (tmp_path / "in.tsv").write_text(
        "review\tid\n" + "".join(f"{t}\t{i}\n" for i, t in enumerate(plain))
    )
    files["in.tsv"] = plain
    (tmp_path / "in.json").write_text(
        json.dumps([{"review": t, "id": i} for i, t in enumerate(texts)], indent=1)
    )
    files["in.json"] = texts
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"review": t}) + "\n" for t in texts)
    files["in.jsonl.gz"] = texts
    pq.write_table(pa.table({"review": texts, "n": list(range(4))}), tmp_path / "in.parquet")
    files["in.parquet"] = texts
    (tmp_path / "in.txt").write_text("good\n\nso so\nbad\n")
    files["in.txt"] = plain
    for name, expected in files.items():
        with pytest.raises(SystemExit) as exit_:
            main(
                [
                    "classify",
                    str(out),
                    "--file",
                    str(tmp_path / name),
                    "--text-field",
                    "review",
                    "--device",
                    "cpu",
                ]
            )
        captured = capsys.readouterr()
        assert exit_.value.code == 0, (name, captured.err)
        rows = [json.loads(line) for line in captured.out.splitlines()]
        assert [r["text"] for r in rows] == expected, name
        assert [r["label"] for r in rows] == clf.predict(expected).tolist(), name

    # streamed: the first block is printed before a blank row further on stops the command
    n = BLOCK_ROWS + 6
    big = tmp_path / "big.jsonl"
    big.write_text(
        "".join(json.dumps({"text": "   " if i == n - 2 else f"row {i}"}) + "\n" for i in range(n))
    )
    with pytest.raises(SystemExit) as exit_:
        main(["classify", str(out), "--file", str(big), "--device", "cpu"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2
    assert len(captured.out.splitlines()) == BLOCK_ROWS
    assert captured.err.strip() == f"layerfusion: error: {big}:{n - 1}: field 'text' is empty"


# -- save (item 12) ---------------------------------------------------------------------------------


def test_save_is_a_set_and_keeps_a_users_readme(trained, tmp_path, monkeypatch):
    a = Classifier.from_checkpoint(trained[0], device="cpu")
    b = Classifier.from_checkpoint(trained[0], device="cpu")
    with torch.no_grad():
        b.head.classifier.bias += torch.tensor([3.0, -3.0])  # another head, same settings
    folder = a.save(tmp_path / "clf")
    expected_a = a.predict_proba(TEXTS)
    assert not np.allclose(expected_a, b.predict_proba(TEXTS), atol=1e-3)

    # an interruption just before the settings are in place: never b's head under a's settings
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(dst).name == "classifier.json":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        b.save(folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "head.safetensors",
    ]  # no temp files
    with pytest.raises(CheckpointError, match="no classifier.json.*did not finish; save it again"):
        Classifier.load(folder)
    b.save(folder)
    assert np.allclose(
        Classifier.load(folder).predict_proba(TEXTS), b.predict_proba(TEXTS), atol=1e-6
    )

    # a head file replaced after the save is refused
    other = a.save(tmp_path / "other")
    shutil.copy(other / "head.safetensors", folder / "head.safetensors")
    with pytest.raises(CheckpointError, match="is not the head classifier.json was saved with"):
        Classifier.load(folder)

    # README.md: the card save wrote is updated; a user's README (or an edited card) is kept
    card = (other / "README.md").read_text()
    a.save(other)
    assert (other / "README.md").read_text() == card
    (other / "README.md").write_text("# my model\n\nnotes\n")
    with pytest.warns(UserWarning, match="README.md is kept.*overwrite_readme=True"):
        b.save(other)
    assert (other / "README.md").read_text() == "# my model\n\nnotes\n"
    b.save(other, overwrite_readme=True)
    assert (other / "README.md").read_text() == card


def _shape(result):
    """The nesting of a pipeline result, dicts by their keys."""
    if isinstance(result, dict):
        return tuple(sorted(result))
    return [_shape(r) for r in result]
