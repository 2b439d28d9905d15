"""Layer selection strategies over a score table `{encoder: {layer: score}}`; each returns `{encoder: [layers]}`."""

from __future__ import annotations

import math

from layerfusion.errors import ConfigError
from layerfusion.fusion.heads import resolve_layers


def ranked(scores: dict[int, float]) -> list[int]:
    """Layers from best to worst score; ties go to the deeper layer, NaN scores last."""
    return sorted(scores, key=lambda i: (math.isnan(scores[i]), -_finite(scores[i]), -i))


def select_top_k(
    scores: dict[str, dict[int, float]], k: int | dict[str, int]
) -> dict[str, list[int]]:
    """The `k` best layers of each encoder (`k` per encoder when a dict; clipped to the encoder's depth)."""
    out = {}
    for encoder, layer_scores in scores.items():
        n = k.get(encoder) if isinstance(k, dict) else k
        if n is None:
            raise ConfigError(f"top_k: no k given for encoder {encoder!r}; k has {sorted(k)}")
        if n < 1:
            raise ConfigError(f"top_k: k must be >= 1, got {n} for encoder {encoder!r}")
        out[encoder] = sorted(ranked(layer_scores)[:n])
    return out


def select_cumulative(scores: dict[str, dict[int, float]], share: float) -> dict[str, list[int]]:
    """Per encoder, the smallest set of best layers whose scores sum to at least `share` of the encoder's total."""
    if not 0 < share <= 1:
        raise ConfigError(f"cumulative: share must be in (0, 1], got {share}")
    out = {}
    for encoder, layer_scores in scores.items():
        order = ranked(layer_scores)
        total = sum(_finite(layer_scores[i]) for i in order)
        chosen, running = [], 0.0
        for layer in order:
            chosen.append(layer)
            running += _finite(layer_scores[layer])
            if running >= share * total - 1e-12:
                break
        out[encoder] = sorted(chosen)
    return out


def select_fixed(layers: dict[str, list[int]], num_layers: dict[str, int]) -> dict[str, list[int]]:
    """`layers` as given (negative = from the end), checked against each encoder's depth; encoders left out keep all."""
    return resolve_layers("gated", num_layers, layers)


def _finite(v: float) -> float:
    return 0.0 if math.isnan(v) else v
