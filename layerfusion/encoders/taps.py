"""Forward hooks that pool every layer's output the moment it is produced, into per-call state."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from torch import nn

from layerfusion.errors import ConfigError

Pooling = Literal["mean", "cls", "last"]


class LayerTaps:
    """Forward hooks on `modules` (layer 0 = embeddings output) that keep only pooled `[B, d]` vectors.

    Every forward pass records into its own `Recording`: `with taps.record(mask, depth) as rec:
    model(...)`, then `rec.stack()` gives `[B, depth+1, d]`. The hooks find the recording of the call
    they run in through a context variable, so threads (and asyncio tasks) running one model at once
    never share a mask, a depth or a pooled vector. A forward pass outside `record` records nothing.
    With `stop_before(blocks)`, a pass stops (early exit) before the first block whose output no layer
    `0..depth` needs; the model itself is never changed per call.
    """

    def __init__(self, modules: list[nn.Module], pooling: Pooling = "mean") -> None:
        if pooling not in ("mean", "cls", "last"):
            raise ConfigError(f"pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        self.pooling = pooling
        self.num_layers = len(modules)
        self._handles = [m.register_forward_hook(_Tap(self, i)) for i, m in enumerate(modules)]
        self._stops: list[nn.Module] = []
        self._stop_handles: list = []

    @contextmanager
    def record(self, attention_mask: torch.Tensor, depth: int | None = None) -> Iterator[Recording]:
        """A recording of layers `0..depth` (default: all) for the forward passes run inside, in this
        thread or task only; an early exit of this recording ends the `with` block quietly."""
        recording = Recording(self, attention_mask, self.num_layers - 1 if depth is None else depth)
        token = _RECORDING.set(recording)
        try:
            yield recording
        except EarlyExit as stop:
            if stop.recording is not recording:
                raise
        finally:
            _RECORDING.reset(token)

    def stop_before(self, blocks: Sequence[nn.Module]) -> None:
        """Stop a recorded pass before block `i` once layers `0..i` (all it needs) are recorded.

        `blocks[i]` must run after layers `0..i` are produced (tap `i+1` is its output, or what follows
        it). Hooks go on the modules now in the list: call again after a wrapper (FSDP) replaced them, so
        that the pass stops outside the wrapper, never between its pre- and post-forward work.
        """
        blocks = list(blocks)
        if len(blocks) == len(self._stops) and all(a is b for a, b in zip(blocks, self._stops)):
            return
        with _REGISTERING:
            if len(blocks) == len(self._stops) and all(a is b for a, b in zip(blocks, self._stops)):
                return
            for handle in self._stop_handles:
                handle.remove()
            self._stop_handles = [
                b.register_forward_pre_hook(_Stop(self, i), prepend=True)
                for i, b in enumerate(blocks)
            ]
            self._stops = blocks

    def remove(self) -> None:
        """Remove every hook."""
        for handle in [*self._handles, *self._stop_handles]:
            handle.remove()
        self._handles, self._stop_handles, self._stops = [], [], []

    def __len__(self) -> int:
        return self.num_layers

    @property
    def active(self) -> bool:
        return bool(self._handles)


class Recording:
    """The state of one recorded forward pass: its attention mask, depth and pooled layers."""

    def __init__(self, taps: LayerTaps, attention_mask: torch.Tensor, depth: int) -> None:
        self.taps, self.mask, self.depth = taps, attention_mask, depth
        self.pooled: list[torch.Tensor | None] = [None] * (depth + 1)

    def stack(self) -> torch.Tensor:
        """The pooled outputs of layers `0..depth`, `[B, depth+1, d]`."""
        missing = [i for i, p in enumerate(self.pooled) if p is None]
        if missing:
            raise RuntimeError(
                f"layer taps {missing} did not fire: was the encoder run inside record()?"
            )
        return torch.stack(self.pooled, dim=1)  # type: ignore[arg-type]


class EarlyExit(Exception):
    """Raised by a stop hook to end a recorded forward pass early; caught by `LayerTaps.record`."""

    def __init__(self, recording: Recording) -> None:
        super().__init__("early exit")
        self.recording = recording


_RECORDING: ContextVar[Recording | None] = ContextVar("layerfusion_taps_recording", default=None)
_REGISTERING = threading.Lock()  # module level: a lock attribute would not pickle for ddp_spawn


class _Tap:
    """The forward hook of one layer (a class, not a closure, so that the model pickles for ddp_spawn)."""

    def __init__(self, taps: LayerTaps, index: int) -> None:
        self.taps, self.index = taps, index

    @torch.compiler.disable  # runs eagerly inside a compiled model: a context variable cannot be traced
    def __call__(self, module: nn.Module, args, output) -> None:
        recording = _RECORDING.get()
        if recording is None or recording.taps is not self.taps or self.index > recording.depth:
            return  # not recording this encoder, or above the requested depth: nothing to record
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        with torch.autocast(hidden.device.type, enabled=False):  # pool in fp32 under autocast too
            recording.pooled[self.index] = pool(hidden, recording.mask, self.taps.pooling)


class _Stop:
    """The forward pre-hook of block `index`: ends a recorded pass that needs no layer above `index`."""

    def __init__(self, taps: LayerTaps, index: int) -> None:
        self.taps, self.index = taps, index

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args) -> None:
        recording = _RECORDING.get()
        if recording is not None and recording.taps is self.taps and self.index >= recording.depth:
            raise EarlyExit(recording)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool `[B, T, d]` hidden states to `[B, d]`: masked mean, first or last non-pad token."""
    hidden = hidden.float()  # pool in fp32 whatever the encoder's dtype
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "cls":  # the first real token: position 0 with right padding, not a left pad
        return hidden[rows, mask.long().argmax(dim=1)]
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * positions).argmax(dim=1)  # works for left and right padding
    return hidden[rows, last]
