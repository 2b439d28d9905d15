"""Fusion heads: the gated method and its baselines."""

from layerfusion.fusion.heads import (
    HEADS,
    ConcatHead,
    GatedFusionHead,
    LastLayerHead,
    MeanLayersHead,
    SingleLayerHead,
    build_head,
)

__all__ = [
    "HEADS",
    "ConcatHead",
    "GatedFusionHead",
    "LastLayerHead",
    "MeanLayersHead",
    "SingleLayerHead",
    "build_head",
]
