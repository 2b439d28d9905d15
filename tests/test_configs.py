"""Every shipped config names real classes and real arguments (parsed in-process, no training)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import REPO

TRAINER_ARGS = set(inspect.signature(L.Trainer.__init__).parameters)


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _check_class_spec(spec: dict) -> None:
    cls = _class(spec["class_path"])
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = set(spec.get("init_args") or {}) - set(params)
    assert takes_kwargs or not unknown, f"{spec['class_path']} has no arguments {unknown}"


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "trainer").glob("*.yaml")), ids=lambda p: p.stem
)
def test_trainer_presets(path: Path):
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) <= TRAINER_ARGS, set(cfg) - TRAINER_ARGS
    if isinstance(cfg.get("strategy"), dict):
        _check_class_spec(cfg["strategy"])


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "logger").glob("*.yaml")), ids=lambda p: p.stem
)
def test_logger_presets(path: Path):
    _check_class_spec(yaml.safe_load(path.read_text()))


RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted(
    (REPO / "configs" / "experiments").glob("*.yaml")
)


@pytest.mark.parametrize(
    "path",
    RUN_CONFIGS,
    ids=lambda p: f"{p.parent.name}-{p.stem}" if p.parent.name != "configs" else p.stem,
)
def test_run_configs(path: Path):
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg["trainer"]) <= TRAINER_ARGS
    for spec in cfg["trainer"].get("callbacks", []) + cfg["trainer"].get("plugins", []):
        _check_class_spec(spec)
    if isinstance(cfg["trainer"].get("logger"), dict):
        _check_class_spec(cfg["trainer"]["logger"])
    from layerfusion.module import LayerFusionModule

    assert set(cfg["model"]) <= set(inspect.signature(LayerFusionModule.__init__).parameters)


def test_fsdp_strategy_wraps_each_encoder_block():
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from layerfusion.strategies import FrozenEncoderFSDPStrategy

    policy = FrozenEncoderFSDPStrategy().kwargs["auto_wrap_policy"]
    assert {BertLayer, LlamaDecoderLayer} <= set(policy._module_classes)
    with pytest.raises(ValueError, match="cannot import 'nope.Block'"):
        FrozenEncoderFSDPStrategy(wrap_classes=["nope.Block"])
