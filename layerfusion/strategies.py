"""FSDP configured for frozen encoders, selectable from YAML."""

from __future__ import annotations

import importlib

from lightning.pytorch.strategies import FSDPStrategy

# transformer block classes of the supported encoders: each becomes its own FSDP unit
BLOCK_CLASSES = [
    "transformers.models.bert.modeling_bert.BertLayer",
    "transformers.models.roberta.modeling_roberta.RobertaLayer",
    "transformers.models.deberta_v2.modeling_deberta_v2.DebertaV2Layer",
    "transformers.models.mpnet.modeling_mpnet.MPNetLayer",
    "transformers.models.gpt2.modeling_gpt2.GPT2Block",
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer",
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
]


class FrozenEncoderFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` with every encoder block wrapped as its own unit, so frozen encoder
    weights and the trainable head never share a flat parameter (Lightning already sets
    `use_orig_params=True`). Lightning's own `auto_wrap_policy` argument cannot be given in YAML
    (its type is a forward reference), hence `wrap_classes`: import paths of the block classes.

    Args:
        wrap_classes: block classes to wrap (default: the blocks of every supported architecture).
        sharding_strategy: FSDP sharding strategy.
        state_dict_type: `full` (one file, what layerfusion's head-only checkpoints need) or `sharded`.
        **kwargs: passed on to `FSDPStrategy`.
    """

    def __init__(
        self,
        wrap_classes: list[str] | None = None,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        **kwargs,
    ) -> None:
        classes = {_import(path) for path in (wrap_classes or BLOCK_CLASSES)}
        super().__init__(
            auto_wrap_policy=classes,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            **kwargs,
        )


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"wrap_classes: cannot import {path!r} ({err})") from err
