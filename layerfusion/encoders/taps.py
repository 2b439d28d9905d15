"""Forward hooks that pool every layer's output the moment it is produced."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from layerfusion.errors import ConfigError

Pooling = Literal["mean", "cls", "last"]


class LayerTaps:
    """Forward hooks on `modules` (layer 0 = embeddings output) that keep only pooled `[B, d]` vectors.

    Set the attention mask with `start(mask, depth)` before the forward pass, read `[B, depth+1, d]` with
    `stack()`; layers above `depth` are not recorded (with early exit they do not run).
    """

    def __init__(self, modules: list[nn.Module], pooling: Pooling = "mean") -> None:
        if pooling not in ("mean", "cls", "last"):
            raise ConfigError(f"pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        self.pooling = pooling
        self._mask: torch.Tensor | None = None
        self._depth = len(modules) - 1
        self._pooled: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def start(self, attention_mask: torch.Tensor, depth: int | None = None) -> None:
        """Arm the taps for one forward pass over inputs with this attention mask, recording layers 0..depth."""
        self._mask = attention_mask
        self._depth = len(self._pooled) - 1 if depth is None else depth
        self._pooled = [None] * len(self._pooled)

    def stack(self) -> torch.Tensor:
        """The pooled outputs of the last forward pass, `[B, depth+1, d]`."""
        kept = self._pooled[: self._depth + 1]
        missing = [i for i, p in enumerate(kept) if p is None]
        if missing:
            raise RuntimeError(
                f"layer taps {missing} did not fire: was the encoder run after start()?"
            )
        out = torch.stack(kept, dim=1)  # type: ignore[arg-type]
        self._pooled = [None] * len(self._pooled)
        self._mask = None
        return out

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._pooled)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _hook(self, index: int) -> _Tap:
        return _Tap(self, index)


class _Tap:
    """The forward hook of one layer (a class, not a closure, so that the model pickles for ddp_spawn)."""

    def __init__(self, taps: LayerTaps, index: int) -> None:
        self.taps, self.index = taps, index

    def __call__(self, module: nn.Module, args, output) -> None:
        taps = self.taps
        if taps._mask is None or self.index > taps._depth:
            return  # not armed by start(), or above the requested depth: nothing to record
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        with torch.autocast(hidden.device.type, enabled=False):  # pool in fp32 under autocast too
            taps._pooled[self.index] = pool(hidden, taps._mask, taps.pooling)


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
