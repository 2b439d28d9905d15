"""Choose the layers the head trains on, per encoder, from the importance scores or a fixed list."""

from __future__ import annotations

import logging
from typing import Literal

import lightning as L
from layerfusion.callbacks.layer_importance import LayerImportance
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from layerfusion.errors import ConfigError
from layerfusion.importance import scores_by_encoder, select_cumulative, select_fixed, select_top_k

log = logging.getLogger(__name__)

Strategy = Literal["top_k", "cumulative", "fixed"]


class LayerSelection(Callback):
    """At the start of `fit` (in `setup`, before the optimizer exists), pick layers per encoder and rebuild
    the head over them; the head then trains on those layers only.

    `top_k` and `cumulative` read the scores of the `LayerImportance` callback of the same trainer (its
    `compute` runs on first use, so the order of the two in `trainer.callbacks` does not matter); `fixed`
    needs no scores. Rank 0's choice is broadcast, so every rank trains the same head. The selection goes
    into checkpoints (by the module) and `test` / `predict` restore it from there.

    Args:
        strategy: `top_k`: the k best-scored layers per encoder; `cumulative`: per encoder, the smallest set
            of best-scored layers whose scores sum to at least `share` of the encoder's total; `fixed`: `layers`.
        k: for `top_k`, layers per encoder: one number for all, or `{encoder: k}` (clipped to the depth).
        share: for `cumulative`, in (0, 1].
        layers: for `fixed`, `{encoder: [layer, ...]}` (0 = embeddings, negative counts from the end);
            encoders left out keep all their layers.
    """

    def __init__(
        self,
        strategy: Strategy = "top_k",
        k: int | dict[str, int] = 3,
        share: float = 0.5,
        layers: dict[str, list[int]] | None = None,
    ) -> None:
        if strategy not in ("top_k", "cumulative", "fixed"):
            raise ConfigError(
                f"LayerSelection: strategy must be 'top_k', 'cumulative' or 'fixed', got {strategy!r}"
            )
        ks = k.values() if isinstance(k, dict) else [k]
        if any(int(n) != n or n < 1 for n in ks):
            raise ConfigError(
                f"LayerSelection: k must be an integer >= 1 (or a dict of them), got {k!r}"
            )
        if not 0 < share <= 1:
            raise ConfigError(f"LayerSelection: share must be in (0, 1], got {share}")
        if strategy == "fixed" and not layers:
            raise ConfigError(
                "LayerSelection: strategy 'fixed' needs `layers`, e.g. {all-MiniLM-L6-v2: [4, 6]}"
            )
        self.strategy, self.k, self.share = strategy, k, float(share)
        self.layers = {e: list(v) for e, v in layers.items()} if layers else None
        self.selection: dict[str, list[int]] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        head = getattr(pl_module.hparams, "head", None)
        if head == "last_layer":
            raise ConfigError(
                "LayerSelection: model.head=last_layer always reads the last layer; use another head or drop LayerSelection"
            )
        selection = self.choose(trainer, pl_module)
        selection = trainer.strategy.broadcast(selection, src=0)
        if selection != pl_module.selection:
            pl_module.set_selection(selection)
        self.selection = pl_module.selection
        log.info("layer selection (%s): %s", self.strategy, self.selection)

    def choose(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, list[int]]:
        """The layers per encoder by this callback's strategy."""
        num_layers = {k: e.num_layers for k, e in pl_module.encoders.items()}
        if self.strategy == "fixed":
            return select_fixed(self.layers, num_layers)
        found = [c for c in trainer.callbacks if isinstance(c, LayerImportance)]
        if len(found) != 1:
            raise ConfigError(
                f"LayerSelection(strategy={self.strategy!r}) needs exactly one LayerImportance callback in "
                f"trainer.callbacks, found {len(found)}; add layerfusion.callbacks.LayerImportance or use strategy 'fixed'"
            )
        scores = scores_by_encoder(found[0].compute(trainer, pl_module))
        if self.strategy == "top_k":
            return select_top_k(scores, self.k)
        return select_cumulative(scores, self.share)

    @override
    def state_dict(self) -> dict:
        return {"strategy": self.strategy, "selection": self.selection}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.selection = state_dict.get("selection")
