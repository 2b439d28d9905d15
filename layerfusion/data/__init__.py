"""Data sources, the label map and batching."""

from layerfusion.data.datamodule import TextClassificationDataModule
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
