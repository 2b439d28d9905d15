"""Reading `{"text": ..., "label": ...}` JSON Lines files with errors that name file and line."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from layerfusion.errors import LayerFusionError


class DataError(LayerFusionError, ValueError):
    """Bad data in a source file: the message names the file, the line and what was expected."""


@dataclass
class Examples:
    """The texts and (string) labels of one split, with where they came from."""

    texts: list[str]
    labels: list[str | None]
    source: str
    lines: list[int] | None = None  # 1-based line number of each example in `source`, when known

    def __len__(self) -> int:
        return len(self.texts)


def read_jsonl(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    require_labels: bool = True,
) -> Examples:
    """Read one split from a `.jsonl` or `.jsonl.gz` file; raise `DataError` naming file and line."""
    path = Path(path)
    texts: list[str] = []
    labels: list[str | None] = []
    lines: list[int] = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                text, label = _parse_line(
                    raw, path, lineno, text_field, label_field, require_labels
                )
                if text is None:
                    continue
                texts.append(text)
                labels.append(label)
                lines.append(lineno)
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read file ({err})") from err
    if not texts:
        raise DataError(
            f"{path}: no examples (the file is empty); expected one JSON object per line"
        )
    return Examples(texts, labels, str(path), lines)


def _parse_line(
    raw: bytes, path: Path, lineno: int, text_field: str, label_field: str, require_labels: bool
) -> tuple[str | None, str | None]:
    """Parse one line: (text, label), or (None, None) for a blank line."""
    where = f"{path}:{lineno}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{where}: not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8"
        ) from err
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object with '{text_field}' and '{label_field}', got {type(obj).__name__}"
        )
    if text_field not in obj:
        raise DataError(f"{where}: missing field '{text_field}' (keys present: {sorted(obj)})")
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field '{text_field}' must be a string, got {type(text).__name__}"
        )
    if not text.strip():
        raise DataError(f"{where}: field '{text_field}' is empty")
    if label_field not in obj or obj[label_field] is None:
        if require_labels:
            raise DataError(f"{where}: missing field '{label_field}' (keys present: {sorted(obj)})")
        return text, None
    label = obj[label_field]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(
            f"{where}: field '{label_field}' must be a string or an integer, got {label!r}"
        )
    return text, str(label)
