"""Lightning callbacks of layerfusion, installed as `layerfusion.callbacks`."""

from layerfusion.callbacks.layer_importance import LayerImportance
from layerfusion.callbacks.layer_selection import LayerSelection
from layerfusion.callbacks.prediction_writer import PredictionWriter

__all__ = ["LayerImportance", "LayerSelection", "PredictionWriter"]
