"""Lightning callbacks of layerfusion, installed as `layerfusion.callbacks`."""

from layerfusion.callbacks.prediction_writer import PredictionWriter

__all__ = ["PredictionWriter"]
