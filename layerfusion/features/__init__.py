"""The on-disk cache of pooled per-layer features (names load lazily: `features.entry` alone needs no
transformers)."""

from __future__ import annotations

import importlib

__all__ = ["CachedFeatures", "FeatureCache", "FeatureCacheError"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("layerfusion.features.cache"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
