"""Frozen encoders and the layer taps that pool every layer."""

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.encoders.offline import materialize, resolve_model
from layerfusion.encoders.taps import LayerTaps, pool

__all__ = ["EncoderSpec", "FrozenEncoder", "LayerTaps", "materialize", "pool", "resolve_model"]
