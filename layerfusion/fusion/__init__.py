"""Fusion heads: the gated method and its baselines."""

from layerfusion.fusion.heads import (
    HEADS,
    ConcatHead,
    EncoderDropoutGatedHead,
    GatedFusionHead,
    LastLayerHead,
    LinearHead,
    MeanLayersHead,
    MixConcatHead,
    SingleLayerHead,
    build_head,
)

__all__ = [
    "HEADS",
    "ConcatHead",
    "EncoderDropoutGatedHead",
    "GatedFusionHead",
    "LastLayerHead",
    "LinearHead",
    "MeanLayersHead",
    "MixConcatHead",
    "SingleLayerHead",
    "build_head",
]
