"""The on-disk cache of pooled per-layer features."""

from layerfusion.features.cache import FeatureCache

__all__ = ["FeatureCache"]
