"""Lightning callbacks of layerfusion, installed as `layerfusion.callbacks`."""

from layerfusion.callbacks.layer_importance import LayerImportance
from layerfusion.callbacks.layer_selection import LayerSelection
from layerfusion.callbacks.prediction_writer import PredictionWriter
from layerfusion.callbacks.resource_monitor import ResourceMonitor
from layerfusion.callbacks.run_report import EvalPredictions, RunReport

__all__ = [
    "EvalPredictions",
    "LayerImportance",
    "LayerSelection",
    "PredictionWriter",
    "ResourceMonitor",
    "RunReport",
]
