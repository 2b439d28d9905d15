"""Every shipped config goes through the real CLI parser (in-process, nothing instantiated): run configs,
experiment configs, trainer presets and logger presets; typos in any part of a config are refused."""

from __future__ import annotations

import os
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


PAIR = ["sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-mpnet-base-v2"]
OWN_DATA = {"custom": ["--data.train_path", "train.csv"]}  # configs without a named dataset


@pytest.mark.parametrize(
    "path", RUN_CONFIGS, ids=lambda p: p.stem if p.parent == CONFIGS else f"experiments-{p.stem}"
)
def test_run_configs(path: Path):
    """Each run config parses; `--trainer.default_root_dir` moves every path it writes (logger,
    checkpoints, predictions); `make fit` tests the checkpoint the config writes."""
    import yaml

    from layerfusion.data.sources import NAMED_DATASETS
    from layerfusion.run_paths import best_checkpoint

    extra = OWN_DATA.get(path.stem, [])
    cfg = parse("--config", str(path), *extra)
    if path.stem == "custom":
        assert cfg.data.dataset is None and cfg.data.train_path == "train.csv"
    else:
        assert cfg.data.dataset in NAMED_DATASETS
    names = [e.name for e in cfg.model.encoders]
    assert names == (["Qwen/Qwen3-0.6B", PAIR[1]] if path.stem == "llm_qwen3" else PAIR)
    assert cfg.trainer.plugins[0].class_path == "layerfusion.checkpoint_io.SafeCheckpointIO"
    callbacks = [c.class_path for c in cfg.trainer.callbacks]
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks
    assert all(c.startswith(("lightning.pytorch.", "layerfusion.callbacks.")) for c in callbacks)

    root = yaml.safe_load(path.read_text())["trainer"]["default_root_dir"]
    assert best_checkpoint(path) == f"{root}/checkpoints/best.ckpt"
    moved = parse("--config", str(path), *extra, "--trainer.default_root_dir", "runs/mine")
    written = [moved.trainer.logger.init_args.save_dir] + [
        v
        for c in moved.trainer.callbacks
        for k in ("dirpath", "path")
        if (v := (c.get("init_args") or {}).get(k)) is not None
    ]
    assert len(written) >= 2 and all(str(p).startswith("runs/mine") for p in written), written
    assert "${" not in str(moved)


@pytest.mark.parametrize("dataset", ["sst2", "mr", "r8", "r52"])
def test_paper_configs_share_one_callback_list(dataset, tmp_path, monkeypatch):
    """The paper configs name `configs/callbacks/paper.yaml` as their callbacks, read relative to the
    config from any working directory; `read_config` (what scripts edit) inlines the same list."""
    import yaml

    from layerfusion.run_paths import read_config

    path = CONFIGS / f"{dataset}.yaml"
    assert yaml.safe_load(path.read_text())["trainer"]["callbacks"] == "callbacks/paper.yaml"
    shared = yaml.safe_load((CONFIGS / "callbacks" / "paper.yaml").read_text())
    assert read_config(path)["trainer"]["callbacks"] == shared
    monkeypatch.chdir(tmp_path)
    parsed = [c.class_path for c in parse("--config", str(path)).trainer.callbacks]
    assert parsed == [c["class_path"] for c in shared]


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
    logger = parse(
        "--config",
        QUICKSTART,
        "--trainer.logger",
        str(path),
        "--trainer.default_root_dir",
        "runs/x",
    ).trainer.logger
    assert logger.class_path == preset["class_path"]
    expected = {
        k: v.replace("${trainer.default_root_dir}", "runs/x") if isinstance(v, str) else v
        for k, v in preset["init_args"].items()
    }
    assert {k: logger.init_args[k] for k in preset["init_args"]} == expected
    assert logger.init_args.save_dir == "runs/x"


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

    policy = FrozenEncoderFSDPStrategy().kwargs["auto_wrap_policy"]  # a CustomPolicy
    assert {BertLayer, LlamaDecoderLayer} <= set(policy._lambda_fn.block_types)
    with pytest.raises(ValueError, match="cannot import 'nope.Block'"):
        FrozenEncoderFSDPStrategy(wrap_classes=["nope.Block"])


def test_wandb_is_offline_unless_wandb_mode_is_online(tmp_path, monkeypatch):
    """`offline: true` (the shipped configs) starts W&B offline, or online under WANDB_MODE=online, as
    `reproduce` and `analyze` do. No network here: `wandb.init` is stopped at the call and reports the
    mode it would have started in."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from layerfusion.cli import _prepare_wandb

    class Started(Exception):
        pass

    def init(**kwargs):
        raise Started(os.environ.get("WANDB_MODE"))

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "run", None)
    preset = parse("--config", QUICKSTART).trainer.logger
    assert preset.init_args.offline is True
    for env, mode in (("online", "online"), ("offline", "dryrun"), (None, "dryrun")):
        if env is None:
            monkeypatch.delenv("WANDB_MODE", raising=False)
        else:
            monkeypatch.setenv("WANDB_MODE", env)
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="layerfusion")
        _prepare_wandb(logger)
        with pytest.raises(Started) as started:
            logger.experiment  # noqa: B018
        assert str(started.value) == mode, env


def test_llm_config_fits_a_tiny_qwen3(tmp_path, shared_data, minilm_dir, caplog):
    """configs/llm_qwen3.yaml as shipped (pooling, bf16 weights, token budget, importance on a sample,
    top-3 selection), its encoder list replaced the documented way: Qwen3-0.6B by a tiny random
    Qwen3 of the same architecture, MPNet by a tiny random BERT; a 1-epoch fit on an SST-2 slice."""
    import json
    import logging
    import shutil

    import torch
    import yaml
    from conftest import tiny_config
    from transformers import AutoModel

    from layerfusion.cli import cli_main
    from layerfusion.run_paths import best_checkpoint

    vocab = json.loads((Path(minilm_dir) / "config.json").read_text())["vocab_size"]
    qwen, bert = tmp_path / "qwen3", tmp_path / "bert"
    for arch, path in (("qwen3", qwen), ("bert", bert)):
        torch.manual_seed(0)
        AutoModel.from_config(tiny_config(arch, vocab)).save_pretrained(path)
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ):
            shutil.copy(Path(minilm_dir) / f, path / f)
    llm = CONFIGS / "llm_qwen3.yaml"
    shipped = yaml.safe_load(llm.read_text())["model"]["encoders"]
    assert shipped[0]["pooling"] == "mean" and shipped[0]["torch_dtype"] == "bfloat16"
    encoders = [
        {**shipped[0], "name": str(qwen), "max_length": 32},
        {**shipped[1], "name": str(bert), "max_length": 32},
    ]
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="layerfusion"):
        cli_main(
            [
                "fit",
                "--config", str(llm),
                "--model.encoders", json.dumps(encoders),
                "--model.cache_dir", str(tmp_path / "cache"),
                "--data.data_dir", str(shared_data),
                "--data.max_train_samples", "160",
                "--data.max_eval_samples", "64",
                "--trainer.accelerator", "cpu",
                "--trainer.max_epochs", "1",
                "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "false",  # W&B's offline run: test_cli
                "--trainer.default_root_dir", str(run),
            ]
        )  # fmt: skip
    ckpt = best_checkpoint(llm).replace("runs/llm_qwen3", str(run))
    assert Path(ckpt).is_file()
    selection = torch.load(ckpt, weights_only=True, map_location="cpu")["layerfusion"]["selection"]
    assert sorted(map(len, selection.values())) == [3, 3], selection  # LayerSelection top_k 3
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("manifest.json")]
    dtypes = {m["key"]["encoder"]: m["key"]["encoder_dtype"] for m in manifests}
    assert dtypes[str(qwen)] == "torch.bfloat16"
    before = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extracting ")]
    assert any(" layers x 32 hidden x 2 bytes (float16) = " in m for m in before), before


def test_config_reference_is_current():
    """docs/config.md is what scripts/config_reference.py writes from today's docstrings."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "scripts" / "config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == module.render(), (
        "docs/config.md is out of date: run python scripts/config_reference.py"
    )
    assert "| `train_path` |" in committed and "## callbacks: LayerSelection" in committed
