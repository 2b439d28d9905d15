"""Data sources, the label map and batching."""

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.data.readers import DataError, read_file, read_jsonl
from layerfusion.data.sources import NAMED_DATASETS

__all__ = ["NAMED_DATASETS", "DataError", "TextClassificationDataModule", "read_file", "read_jsonl"]
