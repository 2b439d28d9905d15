"""FSDP configured for frozen encoders and a small trainable head, selectable from YAML."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as _lightning_fsdp
from torch import nn

from layerfusion.encoders.frozen import ARCHITECTURES, FrozenEncoder


class FrozenEncoderFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` whose root FSDP unit holds the trainable head only.

    - `model.features: online`: each `FrozenEncoder` is its own FSDP unit and each of its transformer
      blocks a unit inside it, so frozen encoder weights (any dtype: bf16/fp16 `torch_dtype` included)
      never share a flat parameter with the head, and only the head pays for gradients and their
      reduce-scatter. Encoder units run in the encoders' own precision (their `compute_dtype`), not
      FSDP's mixed precision, so they give the features DDP and one device give.
    - `model.features: cached`: the encoders are `ignored_modules`: not sharded, not wrapped; they only
      run to extract a split not yet cached (also after a checkpoint is restored), each rank its chunks.
    - Buffers are never cast (`buffer_dtype=None`): under `bf16-mixed` Lightning would round every float
      buffer to bf16, RoPE `inv_freq` included. Gradients are reduced in fp32.
    - On the CPU (`accelerator: cpu`, Gloo) FSDP gets `device_id=cpu` and runs: the tests do this.

    Checkpoints stay head-only (`head.*` plus the layerfusion section) and load into a single-process
    run and into `layerfusion.Classifier`. Lightning's own `auto_wrap_policy` argument cannot be given
    in YAML (its type is a forward reference), hence `wrap_classes`: import paths of the block classes.

    Args:
        wrap_classes: block classes to wrap inside each encoder (default: the block class of every
            architecture in `layerfusion.encoders.frozen.ARCHITECTURES`, see `block_classes`).
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
        classes = frozenset(_import(p) for p in wrap_classes) if wrap_classes else block_classes()
        super().__init__(
            auto_wrap_policy=encoder_wrap_policy(classes),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            **kwargs,
        )

    @property
    def mixed_precision_config(self):
        """Lightning's mixed precision for the head, with buffers left alone and fp32 gradient reduction."""
        config = super().mixed_precision_config
        if config is None:
            return None
        return dataclasses.replace(config, reduce_dtype=torch.float32, buffer_dtype=None)

    def setup(self, trainer) -> None:
        """Lightning's FSDP setup, except that a `*-true` precision casts the head only: the frozen
        encoders keep the dtype they were loaded in (their features and weight hashes with it)."""
        plugin = self._precision_plugin
        if plugin is None:
            return super().setup(trainer)
        plugin.convert_module = functools.partial(_convert_all_but_encoders, plugin.convert_module)
        try:
            super().setup(trainer)
        finally:
            del plugin.convert_module  # back to the class's method

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Wrap `model` with the encoders in their own units (online) or ignored (cached); on the CPU
        with `device_id=cpu`."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        kwargs = dict(self.kwargs)
        if getattr(model, "hparams", {}).get("features") == "cached":
            encoders = [m for m in model.modules() if isinstance(m, FrozenEncoder)]
            kwargs["ignored_modules"] = [*kwargs.get("ignored_modules", ()), *encoders]
        device = self.root_device
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=device if device.type == "cpu" else device.index,
            **kwargs,
        )
        _lightning_fsdp._move_torchmetrics_to_device(model, device)
        _lightning_fsdp._setup_activation_checkpointing(
            model, self._activation_checkpointing_kwargs
        )
        return model

    def lightning_module_state_dict(self) -> dict:
        """The head's full state dict (what Lightning does, except on the CPU: FSDP's `offload_to_cpu`
        frees the unsharded parameters it is about to copy when they already are on the CPU)."""
        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return super().lightning_module_state_dict()
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Check a layerfusion checkpoint against the module before FSDP loads it into the wrapped model.

        FSDP loads the weights here, into the already wrapped model and bypassing the module's own
        `load_state_dict`: a head over other layers cannot be rebuilt any more (clear error instead), and
        the head-only state dict is loaded non-strictly once its keys are checked to be the head's."""
        module = self.lightning_module
        path = Path(checkpoint_path)
        if path.is_file() and hasattr(module, "check_checkpoint_head"):
            from layerfusion.checkpoint import read_checkpoint

            module.check_checkpoint_head(read_checkpoint(path))
            strict, module.strict_loading = module.strict_loading, False
            try:
                return super().load_checkpoint(checkpoint_path, weights_only)
            finally:
                module.strict_loading = strict
        return super().load_checkpoint(checkpoint_path, weights_only)


def _convert_all_but_encoders(convert, module: nn.Module) -> nn.Module:
    """`convert` (a precision plugin's `convert_module`) applied to every child of `module` that holds
    no `FrozenEncoder`."""
    for child in module.children():
        if not any(isinstance(m, FrozenEncoder) for m in child.modules()):
            convert(child)
    return module


def encoder_wrap_policy(block_types: frozenset[type]):
    """The FSDP policy: every `FrozenEncoder` and every block of `block_types` is its own unit, in the
    weights' own dtype (no mixed precision: the encoder's `compute_dtype` decides how it computes)."""
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import CustomPolicy

    return CustomPolicy(_EncoderUnits(block_types, MixedPrecision()))


class _EncoderUnits:
    """`CustomPolicy`'s function (a class, so the strategy pickles for spawned ranks)."""

    def __init__(self, block_types: frozenset[type], precision) -> None:
        self.block_types, self.precision = tuple(block_types), precision

    def __call__(self, module: nn.Module):
        if isinstance(module, (FrozenEncoder, *self.block_types)):
            return {"mixed_precision": self.precision}
        return False


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
