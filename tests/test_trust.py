"""Loading an artifact never turns `trust_remote_code` on: only the caller's argument or config can.

The trap is a real model directory whose `config.json` has an `auto_map` to Python code that, when
executed, writes a marker file. Checkpoints and classifier folders that claim `trust_remote_code: true`
are loaded through every public path; the marker must never appear. The last test is the positive
control: the same directory does run its code when the caller asks for it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from layerfusion.classifier import Classifier
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import ConfigError
from layerfusion.module import LayerFusionModule

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL = """
import os
from pathlib import Path

Path(os.environ["LAYERFUSION_TEST_MARKER"]).write_text("remote code ran")

from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = "bert"


class EvilModel(BertModel):
    config_class = EvilConfig
"""


@pytest.fixture(scope="module")
def trap(tmp_path_factory, tiny_models):
    """(model dir with remote code, checkpoint claiming trust_remote_code, marker path)."""
    d = tmp_path_factory.mktemp("trust")
    model_dir = d / "evil_bert"
    shutil.copytree(tiny_models["bert"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil.py").write_text(EVIL)
    marker = d / "marker"
    spec = EncoderSpec(str(model_dir), max_length=16, alias="bert", compute_dtype="float32")
    module = LayerFusionModule(
        [spec], ["neg", "pos"], layers={"bert": [1, 2]}, hidden=8, cache_dir=str(d / "cache")
    )
    import lightning

    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    ckpt["hyper_parameters"]["encoders"] = [
        {**e, "trust_remote_code": True} for e in ckpt["hyper_parameters"]["encoders"]
    ]
    module.on_save_checkpoint(ckpt)
    path = d / "evil.ckpt"
    torch.save(ckpt, path)
    return model_dir, path, marker


@pytest.fixture(autouse=True)
def _marker_env(trap, monkeypatch):
    monkeypatch.setenv("LAYERFUSION_TEST_MARKER", str(trap[2]))


def test_classifier_from_checkpoint_ignores_the_checkpoints_trust(trap):
    _, ckpt, marker = trap
    clf = Classifier.from_checkpoint(ckpt)
    assert not marker.exists()
    assert clf.predict(["fine"])[0] in ("neg", "pos")


def test_classifier_load_ignores_the_folders_trust(trap, tmp_path):
    _, ckpt, marker = trap
    folder = Classifier.from_checkpoint(ckpt).save(tmp_path / "clf")
    config = json.loads((folder / "classifier.json").read_text())
    assert config["encoders"][0]["trust_remote_code"] is True  # what the artifact claims
    Classifier.load(folder)
    assert not marker.exists()


def test_module_load_from_checkpoint_ignores_the_checkpoints_trust(trap):
    _, ckpt, marker = trap
    module = LayerFusionModule.load_from_checkpoint(ckpt, cache_dir=str(ckpt.parent / "cache"))
    assert not marker.exists()
    assert module.hparams.encoders[0]["trust_remote_code"] is False


def test_cli_refuses_a_checkpoint_that_differs_on_trust_or_name(
    trap, tmp_path, shared_data, monkeypatch
):
    """`predict --ckpt_path`: Lightning would merge the checkpoint's hyperparameters over the config."""
    import yaml

    from layerfusion.cli import cli_main

    model_dir, ckpt, marker = trap
    encoder = {"name": str(model_dir), "max_length": 16, "alias": "bert"}
    config = {
        "model": {"encoders": [encoder], "layers": {"bert": [1, 2]}, "hidden": 8},
        "data": {"dataset": "sst2", "data_dir": str(shared_data)},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr("sys.argv", ["layerfusion"])  # the CLI's arguments are `args`, not pytest's
    args = ["predict", "--config", str(tmp_path / "c.yaml"), "--ckpt_path", str(ckpt)]
    with pytest.raises(ConfigError, match=r"encoders\[0\]\.trust_remote_code=True.*has False"):
        cli_main(args)
    config["model"]["encoders"][0] = {**encoder, "name": "other/model"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"encoders\[0\]\.name=.*evil_bert.*'other/model'"):
        cli_main(args)
    config["model"]["encoders"][0] = {**encoder, "revision": "v2"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"encoders\[0\]\.revision=None; the config has 'v2'"):
        cli_main(args)
    assert not marker.exists()


def test_positive_control_the_trap_runs_when_trusted(trap):
    """Runs last: Python imports the trap's module once per process."""
    from transformers import AutoModel

    model_dir, _, marker = trap
    AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    assert marker.read_text() == "remote code ran"
