"""Data sources, the label map and batching (the DataModule is imported on first use: it needs Lightning)."""

from layerfusion.data.readers import DataError, Row, iter_file, read_file, read_jsonl
from layerfusion.data.sources import NAMED_DATASETS

__all__ = [
    "NAMED_DATASETS",
    "DataError",
    "Row",
    "TextClassificationDataModule",
    "iter_file",
    "read_file",
    "read_jsonl",
]


def __getattr__(name: str):
    if name == "TextClassificationDataModule":
        from layerfusion.data.datamodule import TextClassificationDataModule

        return TextClassificationDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
