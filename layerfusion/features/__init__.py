"""The on-disk cache of pooled per-layer features."""

from layerfusion.features.cache import CachedFeatures, FeatureCache, FeatureCacheError

__all__ = ["CachedFeatures", "FeatureCache", "FeatureCacheError"]
