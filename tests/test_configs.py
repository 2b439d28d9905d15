"""Every shipped config goes through the real CLI parser (in-process, nothing instantiated): run configs,
experiment configs, trainer presets and logger presets; typos in any part of a config are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from layerfusion.__main__ import main

CONFIGS = REPO / "configs"
RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "experiments").glob("*.yaml"))
QUICKSTART = str(CONFIGS / "quickstart.yaml")


def parse(*args: str):
    """The `fit` config the real CLI builds from `args` (parsed and validated, nothing instantiated)."""
    from layerfusion.cli import ParseOnlyCLI, build_cli

    return build_cli(["fit", *args], ParseOnlyCLI, run=True).config["fit"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["layerfusion"])  # the CLI's arguments are `args`, not pytest's


@pytest.mark.parametrize(
    "path", RUN_CONFIGS, ids=lambda p: p.stem if p.parent == CONFIGS else f"experiments-{p.stem}"
)
def test_run_configs(path: Path):
    cfg = parse("--config", str(path))
    from layerfusion.data.sources import NAMED_DATASETS

    assert cfg.data.dataset in NAMED_DATASETS
    assert [e.name for e in cfg.model.encoders] == [
        "sentence-transformers/all-MiniLM-L6-v2",
        "sentence-transformers/all-mpnet-base-v2",
    ]
    assert cfg.trainer.plugins[0].class_path == "layerfusion.checkpoint_io.SafeCheckpointIO"
    callbacks = [c.class_path for c in cfg.trainer.callbacks]
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks
    assert all(c.startswith(("lightning.pytorch.", "layerfusion.callbacks.")) for c in callbacks)


@pytest.mark.parametrize("path", sorted((CONFIGS / "trainer").glob("*.yaml")), ids=lambda p: p.stem)
def test_trainer_presets(path: Path):
    import yaml

    preset = yaml.safe_load(path.read_text())
    trainer = parse("--config", QUICKSTART, "--trainer", str(path)).trainer
    for key, value in preset.items():
        got = trainer[key]
        if isinstance(value, dict):  # a class spec (the FSDP strategy)
            assert got.class_path == value["class_path"]
            assert {k: got.init_args[k] for k in value["init_args"]} == value["init_args"]
        else:
            assert got == value, key


@pytest.mark.parametrize("path", sorted((CONFIGS / "logger").glob("*.yaml")), ids=lambda p: p.stem)
def test_logger_presets(path: Path):
    import yaml

    preset = yaml.safe_load(path.read_text())
    logger = parse("--config", QUICKSTART, "--trainer.logger", str(path)).trainer.logger
    assert logger.class_path == preset["class_path"]
    assert {k: logger.init_args[k] for k in preset["init_args"]} == preset["init_args"]


FSDP = "layerfusion.strategies.FrozenEncoderFSDPStrategy"
TYPOS = {  # a misspelt key in each part of a config file -> (where, key, value)
    "logger": (("trainer", "logger", "init_args"), "projct", "x"),  # WandbLogger's **kwargs too
    "data": (("data",), "datset", "sst2"),
    "encoder": (("model", "encoders", 0), "poolng", "mean"),
    "trainer": (("trainer",), "max_epoch", 3),
    "callback": (("trainer", "callbacks", 1, "init_args"), "monitr", "val_acc"),
    "strategy": (
        ("trainer",),
        "strategy",
        {"class_path": FSDP, "init_args": {"shardng": "FULL_SHARD"}},
    ),
}


@pytest.mark.parametrize("part", list(TYPOS))
def test_typos_in_a_config_file_are_refused(part, tmp_path, capsys):
    import yaml

    cfg = yaml.safe_load(Path(QUICKSTART).read_text())
    where, key, value = TYPOS[part]
    node = cfg
    for step in where:
        node = node[step]
    node[key] = value
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_:
        parse("--config", str(tmp_path / "typo.yaml"))
    assert exit_.value.code == 2
    misspelt = "shardng" if part == "strategy" else key
    assert misspelt in capsys.readouterr().err


def test_unknown_head_is_one_line(capsys):
    from layerfusion.fusion.heads import HEADS

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, "--model.head", "gatd"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err == [
        f"layerfusion: error: model.head: unknown head 'gatd'; choose one of {', '.join(HEADS)}"
    ]


def test_fsdp_strategy_wraps_each_encoder_block():
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from layerfusion.strategies import FrozenEncoderFSDPStrategy

    policy = FrozenEncoderFSDPStrategy().kwargs["auto_wrap_policy"]
    assert {BertLayer, LlamaDecoderLayer} <= set(policy._module_classes)
    with pytest.raises(ValueError, match="cannot import 'nope.Block'"):
        FrozenEncoderFSDPStrategy(wrap_classes=["nope.Block"])
