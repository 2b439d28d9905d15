"""FSDP wrap policy: every block of every supported architecture is its own unit, the head is not in one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerfusion.encoders.frozen import ARCHITECTURES
from layerfusion.strategies import FrozenEncoderFSDPStrategy, block_classes


def _tiny(model_type: str) -> nn.Module:
    """A random 2-block, 32-wide model of `model_type` (config attribute maps cover GPT-2 / DistilBERT names)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    return AutoModel.from_config(config).requires_grad_(False)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_policy_wraps_every_block_of_every_architecture(model_type):
    encoder = _tiny(model_type)
    _, blocks_path, _ = ARCHITECTURES[model_type]
    blocks = list(encoder.get_submodule(blocks_path))
    assert len(blocks) == 2
    model = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(32, 2)})
    policy = FrozenEncoderFSDPStrategy().kwargs["auto_wrap_policy"]
    # what FSDP itself calls to choose the modules it wraps (FSDP needs an accelerator; the policy does not)
    wrapped = set(policy._run_policy(model, set(), {})) - {model}
    assert {id(m) for m in wrapped} == {id(b) for b in blocks}, (
        f"{model_type}: wraps {sorted(type(m).__name__ for m in wrapped)}, blocks are {type(blocks[0]).__name__}"
    )
    # so the trainable head stays in the root unit, apart from every frozen block
    assert not any(model["head"] is m for w in wrapped for m in w.modules())


def test_block_classes_come_from_the_architecture_table():
    found = block_classes()
    assert found == {type(_tiny(t).get_submodule(ARCHITECTURES[t][1])[0]) for t in ARCHITECTURES}
    names = {c.__name__ for c in found}
    assert {
        "XLMRobertaLayer",
        "CamembertLayer",
        "DebertaLayer",
        "ElectraLayer",
        "Qwen3DecoderLayer",
    } <= names
    with pytest.raises(ValueError, match="cannot import 'nope.Block'"):
        FrozenEncoderFSDPStrategy(wrap_classes=["nope.Block"])
    from transformers.models.bert.modeling_bert import BertLayer

    explicit = FrozenEncoderFSDPStrategy(
        wrap_classes=["transformers.models.bert.modeling_bert.BertLayer"]
    ).kwargs["auto_wrap_policy"]
    assert set(explicit._module_classes) == {BertLayer}
