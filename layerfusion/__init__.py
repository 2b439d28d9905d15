"""layerfusion: layer-aware gated fusion of frozen pretrained encoders for text classification."""

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.module import LayerFusionModule

__all__ = ["EncoderSpec", "FrozenEncoder", "LayerFusionModule", "TextClassificationDataModule"]
__version__ = "0.1.0"
