"""layerfusion: layer-aware gated fusion of frozen pretrained encoders for text classification."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerfusion.classifier import Classifier
    from layerfusion.data.datamodule import TextClassificationDataModule
    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.module import LayerFusionModule

# Imported on first use: the Lightning parts take ~12 s to import, and `Classifier` needs none of them.
_EXPORTS = {
    "Classifier": "layerfusion.classifier",
    "EncoderSpec": "layerfusion.encoders.frozen",
    "FrozenEncoder": "layerfusion.encoders.frozen",
    "LayerFusionModule": "layerfusion.module",
    "TextClassificationDataModule": "layerfusion.data.datamodule",
}
__all__ = [
    "Classifier",
    "EncoderSpec",
    "FrozenEncoder",
    "LayerFusionModule",
    "TextClassificationDataModule",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'layerfusion' has no attribute {name!r}")
