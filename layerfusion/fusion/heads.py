"""Classification heads over pooled per-layer features of several encoders.

Every head takes `features: {encoder: [B, L, d]}` (all layers) and returns logits `[B, C]`;
`layers[encoder]` says which layers it reads. `represent(features)` is the input of its final linear
layer (the fused representation `Classifier.encode` returns).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from layerfusion.errors import ConfigError
from layerfusion.fusion.lbfgs import fit_lbfgs

HeadKind = Literal[
    "gated",
    "gated_encoder_dropout",
    "mix_concat",
    "single_layer",
    "last_layer",
    "mean_layers",
    "concat",
    "linear",
]


class FusionHead(nn.Module):
    """Shared parts: the layer selection per encoder and per-layer normalisation."""

    def __init__(
        self, dims: dict[str, int], layers: dict[str, list[int]], num_classes: int
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"need at least 2 classes, got {num_classes}")
        missing = set(dims) - set(layers)
        if missing or any(not layers[e] for e in dims):
            raise ConfigError(
                f"every encoder needs at least one selected layer; missing for {sorted(missing) or [e for e in dims if not layers[e]]}"
            )
        self.dims = dict(dims)
        self.layers = {e: list(layers[e]) for e in dims}
        for e in dims:
            self.register_buffer(
                f"_idx_{_safe(e)}", torch.tensor(self.layers[e], dtype=torch.long)
            )  # persistent: a state dict says which layers its head reads

    def selected(self, features: dict[str, torch.Tensor], encoder: str) -> torch.Tensor:
        """The selected layers of one encoder, each layer-normalised: `[B, k, d]`."""
        x = features[encoder].index_select(1, getattr(self, f"_idx_{_safe(encoder)}"))
        return F.layer_norm(x.float(), (x.shape[-1],))


class GatedFusionHead(FusionHead):
    """Per encoder a softmax mix of its layers, a projection to `hidden`, a per-example gate over encoders.

    `encoder_dropout`: during training, the probability that an example loses one encoder (chosen
    uniformly): its projected vector is zeroed and the gate renormalises over the others, so no
    branch can be ignored by a winner-take-all gate. Masked, not skipped: every parameter stays in
    every step's graph (DDP `find_unused_parameters=False`).
    """

    def __init__(
        self,
        dims,
        layers,
        num_classes,
        hidden: int = 256,
        dropout: float = 0.1,
        encoder_dropout: float = 0.0,
    ) -> None:
        super().__init__(dims, layers, num_classes)
        if not 0.0 <= encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {encoder_dropout}")
        self.encoder_dropout = encoder_dropout
        names = list(dims)
        self.mix = nn.ParameterDict(
            {_safe(e): nn.Parameter(torch.zeros(len(self.layers[e]))) for e in names}
        )
        self.proj = nn.ModuleDict({_safe(e): nn.Linear(dims[e], hidden) for e in names})
        self.gate = nn.Linear(hidden * len(names), len(names))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.last_gate: torch.Tensor | None = None

    def layer_weights(self) -> dict[str, torch.Tensor]:
        """The softmax weight of each selected layer, per encoder."""
        return {e: torch.softmax(self.mix[_safe(e)], 0).detach() for e in self.dims}

    def projected(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each encoder's layer mix, projected: `[B, E, hidden]`."""
        out = []
        for e in self.dims:
            x = self.selected(features, e)
            w = torch.softmax(self.mix[_safe(e)], 0)
            mixed = torch.einsum("bkd,k->bd", x, w)
            out.append(F.gelu(self.proj[_safe(e)](self.dropout(mixed))))
        return torch.stack(out, dim=1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.represent(features)))

    def represent(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The gated sum of the projected encoders, `[B, hidden]`."""
        stacked = self.projected(features)  # [B, E, hidden]
        keep = self.encoder_mask(stacked)
        logits = self.gate((stacked * keep.unsqueeze(-1)).flatten(1))
        gate = torch.softmax(logits.masked_fill(keep == 0, float("-inf")), dim=-1)  # [B, E]
        self.last_gate = gate.detach()
        stacked = stacked * keep.unsqueeze(-1)
        return (gate.unsqueeze(-1) * stacked).sum(1)

    def encoder_mask(self, stacked: torch.Tensor) -> torch.Tensor:
        """`[B, E]` ones, with one encoder zeroed per example with probability `encoder_dropout` (training)."""
        b, e = stacked.shape[:2]
        keep = torch.ones(b, e, device=stacked.device, dtype=stacked.dtype)
        if self.training and self.encoder_dropout > 0 and e > 1:
            drop = torch.rand(b, device=stacked.device) < self.encoder_dropout
            which = torch.randint(0, e, (b,), device=stacked.device)
            keep[drop, which[drop]] = 0
        return keep


class EncoderDropoutGatedHead(GatedFusionHead):
    """The gated head with encoder dropout 0.5 (ablation: does the gate starve the weaker encoder?)."""

    def __init__(self, dims, layers, num_classes, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims, layers, num_classes, hidden, dropout, encoder_dropout=0.5)


class MixConcatHead(GatedFusionHead):
    """The gated head without its gate (ablation): per-encoder layer mix and projection, encoders concatenated."""

    def __init__(self, dims, layers, num_classes, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims, layers, num_classes, hidden, dropout)
        del self.gate
        self.classifier = nn.Linear(hidden * len(self.dims), num_classes)

    def represent(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projected encoders concatenated, `[B, E * hidden]`."""
        return self.projected(features).flatten(1)


class MeanLayersHead(FusionHead):
    """Mean of the selected layers per encoder, encoders concatenated, then an MLP."""

    def __init__(self, dims, layers, num_classes, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims, layers, num_classes)
        self.mlp = _mlp(sum(dims.values()), hidden, num_classes, dropout)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp[-1](self.represent(features))

    def represent(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The MLP's hidden activation, `[B, hidden]`."""
        x = torch.cat([self.selected(features, e).mean(1) for e in self.dims], dim=-1)
        return self.mlp[:-1](x)


class SingleLayerHead(MeanLayersHead):
    """Exactly one layer per encoder (encoders concatenated), then an MLP."""

    def __init__(self, dims, layers, num_classes, hidden: int = 256, dropout: float = 0.1) -> None:
        wrong = {e: layers.get(e) for e in dims if len(layers.get(e) or []) != 1}
        if wrong:
            raise ConfigError(
                f"single_layer head needs exactly one layer per encoder, got {wrong}; set model.layers"
            )
        super().__init__(dims, layers, num_classes, hidden, dropout)


class LastLayerHead(MeanLayersHead):
    """The last layer of each encoder (encoders concatenated), then an MLP."""


class ConcatHead(FusionHead):
    """All selected layers of all encoders concatenated, then an MLP."""

    def __init__(self, dims, layers, num_classes, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims, layers, num_classes)
        width = sum(dims[e] * len(self.layers[e]) for e in dims)
        self.mlp = _mlp(width, hidden, num_classes, dropout)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp[-1](self.represent(features))

    def represent(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The MLP's hidden activation, `[B, hidden]`."""
        x = torch.cat([self.selected(features, e).flatten(1) for e in self.dims], dim=-1)
        return self.mlp[:-1](x)


class LinearHead(FusionHead):
    """A linear classifier (no hidden layer) on the selected layers, layer-normalised and concatenated.

    `fit` trains it to convergence (full-batch L-BFGS, L2 on the weights): the logistic-regression
    probe of SentEval. Through `layerfusion fit` it trains like any head (AdamW, `model.weight_decay`).
    """

    def __init__(self, dims, layers, num_classes, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(dims, layers, num_classes)
        width = sum(dims[e] * len(self.layers[e]) for e in dims)
        self.linear = nn.Linear(width, num_classes)

    def inputs(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The classifier's input `[B, width]`."""
        return torch.cat([self.selected(features, e).flatten(1) for e in self.dims], dim=-1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(self.inputs(features))

    def represent(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The classifier's input `[B, width]` (as `inputs`)."""
        return self.inputs(features)

    def fit(
        self,
        features: dict[str, torch.Tensor],
        labels: torch.Tensor,
        l2: float,
        max_iter: int = 1000,
        tol: float = 1e-6,
    ) -> int:
        """Minimise mean cross-entropy + l2/2 * ||W||^2 (bias unpenalised) from zero weights with
        full-batch L-BFGS; returns the iterations used. The objective of scikit-learn's multinomial
        `LogisticRegression(C=1 / (l2 * N))`; with two classes, of its binary one with `C=2 / (l2 * N)`."""
        x = self.inputs(features).detach()
        y = torch.as_tensor(labels, dtype=torch.long, device=x.device)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        return fit_lbfgs(
            self.linear,
            x,
            y,
            l2,
            max_iter,
            tolerance_grad=tol,
            tolerance_change=1e-12,
            history_size=20,
        )


HEADS: dict[str, type[FusionHead]] = {
    "gated": GatedFusionHead,
    "gated_encoder_dropout": EncoderDropoutGatedHead,
    "linear": LinearHead,
    "mix_concat": MixConcatHead,
    "single_layer": SingleLayerHead,
    "last_layer": LastLayerHead,
    "mean_layers": MeanLayersHead,
    "concat": ConcatHead,
}


def build_head(
    kind: str,
    dims: dict[str, int],
    num_layers: dict[str, int],
    layers: dict[str, list[int]] | None,
    num_classes: int,
    hidden: int = 256,
    dropout: float = 0.1,
) -> FusionHead:
    """Build a head; `layers=None` means all layers (the last one for `last_layer`)."""
    if kind not in HEADS:
        raise ConfigError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    layers = resolve_layers(kind, num_layers, layers)
    return HEADS[kind](dims, layers, num_classes, hidden=hidden, dropout=dropout)


def resolve_layers(
    kind: str, num_layers: dict[str, int], layers: dict[str, list[int]] | None
) -> dict[str, list[int]]:
    """The layer selection per encoder, checked against each encoder's depth."""
    if kind == "last_layer":
        return {e: [n - 1] for e, n in num_layers.items()}
    layers = layers or {}
    unknown = set(layers) - set(num_layers)
    if unknown:
        raise ConfigError(
            f"layers given for unknown encoders {sorted(unknown)}; encoders are {sorted(num_layers)}"
        )
    return {e: layer_set(layers.get(e), n, e) for e, n in num_layers.items()}


def layer_set(layers: Sequence[int] | None, num_layers: int, encoder: str = "encoder") -> list[int]:
    """`layers` as a sorted list of distinct absolute indices (negative counts from the end; None = all):
    the one reading of a layer selection, for the feature cache and the heads."""
    if layers is None:
        return list(range(num_layers))
    bad = [i for i in layers if not -num_layers <= int(i) < num_layers]
    if not layers or bad:
        raise ConfigError(
            f"encoder {encoder!r} has layers 0..{num_layers - 1} (0 = embeddings, negative counts "
            f"from the end); got {list(layers) if not bad else bad}"
        )
    return sorted({int(i) % num_layers for i in layers})


def _mlp(width: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(width, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def _safe(name: str) -> str:
    """A module-dict key for an encoder name (no dots)."""
    return name.replace(".", "_")
