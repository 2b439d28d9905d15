"""Former home of the JSON Lines reader: every format is now read by `layerfusion.data.readers`."""

from layerfusion.data.readers import DataError, Examples, read_jsonl

__all__ = ["DataError", "Examples", "read_jsonl"]
