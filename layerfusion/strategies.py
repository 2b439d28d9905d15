"""FSDP configured for frozen encoders, selectable from YAML."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy

from layerfusion.encoders.frozen import ARCHITECTURES


class FrozenEncoderFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` with every encoder block wrapped as its own unit, so frozen encoder
    weights and the trainable head never share a flat parameter (Lightning already sets
    `use_orig_params=True`). Lightning's own `auto_wrap_policy` argument cannot be given in YAML
    (its type is a forward reference), hence `wrap_classes`: import paths of the block classes.

    Args:
        wrap_classes: block classes to wrap (default: the block class of every architecture in
            `layerfusion.encoders.frozen.ARCHITECTURES`, see `block_classes`).
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
        classes = {_import(path) for path in wrap_classes} if wrap_classes else block_classes()
        super().__init__(
            auto_wrap_policy=set(classes),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            **kwargs,
        )

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Check a layerfusion checkpoint against the module before FSDP loads it into the wrapped model.

        FSDP loads the weights here, into the already wrapped model and bypassing the module's own
        `load_state_dict`: a head over other layers cannot be rebuilt any more (clear error instead), and
        the head-only state dict is loaded non-strictly once its keys are checked to be the head's."""
        module = self.lightning_module
        path = Path(checkpoint_path)
        if path.is_file() and hasattr(module, "check_checkpoint_head"):
            meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            module.check_checkpoint_head(meta)
            strict, module.strict_loading = module.strict_loading, False
            try:
                return super().load_checkpoint(checkpoint_path, weights_only)
            finally:
                module.strict_loading = strict
        return super().load_checkpoint(checkpoint_path, weights_only)


@functools.cache
def block_classes() -> frozenset[type]:
    """The transformer block class of every architecture in `ARCHITECTURES`, found where the layer taps
    find the blocks (`ARCHITECTURES[model_type][1]`) in a one-block model built on the meta device."""
    from transformers import AutoConfig, AutoModel

    found = set()
    for model_type, (_, blocks, _) in ARCHITECTURES.items():
        config = AutoConfig.for_model(model_type, num_hidden_layers=1)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        found.add(type(model.get_submodule(blocks)[0]))
    return frozenset(found)


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"wrap_classes: cannot import {path!r} ({err})") from err
