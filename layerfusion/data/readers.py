"""Reading data files (JSON Lines, JSON, CSV, TSV, Parquet; text formats optionally `.gz`) one row at a time.

`iter_file` is the one reader: training (in memory or streamed), evaluation, `predict` and `classify --file`
all read through it, so every mode decodes labels by the same rule and names the same `file:line` on bad data.
Only the text and label columns are looked at; other columns are never parsed into types. Memory stays flat
whatever the file size, except for a JSON array (`.json` holding `[...]`), which is parsed whole.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import gzip
import json
import logging
import re
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from layerfusion.errors import LayerFusionError

log = logging.getLogger(__name__)

# file suffix -> format; the text formats may also be gzipped (`.jsonl.gz`, `.csv.gz`, ...)
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_SURROGATE = re.compile("[\\ud800-\\udfff]")  # half of a UTF-16 pair: no character, not encodable
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB a cell) refuses long documents
PARQUET_BATCH = 1_000  # rows per Parquet batch


class DataError(LayerFusionError, ValueError):
    """Bad data in a source: the message names the file, the line or row and what was expected."""


class Row(NamedTuple):
    """One example as read: its text, its label as a string (None when absent) and where it is."""

    text: str
    label: str | None
    source: str  # the file (or dataset) it came from
    line: int  # 1-based line where the row starts; 0 where lines do not apply (JSON array, Parquet)
    index: int  # 0-based row number in `source`

    @property
    def where(self) -> str:
        """`file:line`, or `source, row N` where lines do not apply."""
        return f"{self.source}:{self.line}" if self.line else f"{self.source}, row {self.index + 1}"


@dataclass
class Examples:
    """The texts and (string) labels of one split, with where each row came from (plain data: picklable)."""

    texts: list[str]
    labels: list[str | None]
    source: str
    lines: array | None = None  # 1-based line of each source row in its file (0: no line)
    parts: tuple[tuple[str, int], ...] = ()  # (file, first source row) of each file of a split
    rows: list[int] | None = None  # source row of each example, when a subset
    _starts: list[int] = field(default_factory=list, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def collect(cls, rows: Iterable[Row], source: str) -> Examples:
        """All rows of a reader, in order (labels interned: one string object per class)."""
        texts: list[str] = []
        labels: list[str | None] = []
        lines = array("q")
        parts: list[tuple[str, int]] = []
        same: dict[str, str] = {}
        for n, row in enumerate(rows):
            if not parts or parts[-1][0] != row.source:
                parts.append((row.source, n))
            texts.append(row.text)
            labels.append(None if row.label is None else same.setdefault(row.label, row.label))
            lines.append(row.line)
        return cls(texts, labels, source, lines, tuple(parts))

    def where(self, i: int) -> str:
        """Where example `i` is: `file:line` for line-based files, else `source, row N` (1-based)."""
        row = self.rows[i] if self.rows is not None else i
        name, first = self.source, 0
        if self.parts:
            if not self._starts:
                self._starts = [start for _, start in self.parts]
            name, first = self.parts[bisect.bisect_right(self._starts, row) - 1]
        line = self.lines[row] if self.lines is not None and row < len(self.lines) else 0
        return f"{name}:{line}" if line else f"{name}, row {row - first + 1}"

    def take(self, rows: list[int]) -> Examples:
        """The examples at `rows`, remembering where each came from."""
        orig = [self.rows[i] for i in rows] if self.rows is not None else list(rows)
        texts, labels = [self.texts[i] for i in rows], [self.labels[i] for i in rows]
        return Examples(texts, labels, self.source, self.lines, self.parts, orig)


def file_format(path: str | Path) -> str:
    """The format of a data file from its suffix: `json`, `csv`, `tsv` or `parquet`."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
        if suffixes[-1:] == [".parquet"]:
            raise DataError(f"{path}: a Parquet file is compressed inside; do not gzip it")
    fmt = FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise DataError(
            f"{path}: unknown file type; expected one of {', '.join(FORMATS)} (text formats may end in .gz)"
        )
    return fmt


def iter_file(
    path: str | Path,
    text_field: str = "text",
    label_field: str | None = "label",
    require_labels: bool = False,
) -> Iterator[Row]:
    """Yield the rows of a data file one at a time (flat memory); bad data raises `DataError` naming file and line.

    Texts must be non-empty strings. Labels are read as written: a string as is, an integer as its digits
    (a Parquet ClassLabel id as its name); anything else is refused. A row without a label gets None, an
    error when `require_labels`. `label_field=None` reads texts only.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = file_format(path)
    reader = {"json": _json_rows, "csv": _csv_rows, "tsv": _csv_rows, "parquet": _parquet_rows}[fmt]
    rows = 0
    for row in reader(path, fmt, text_field, label_field, require_labels):
        if require_labels and row.label is None:
            raise DataError(f"{row.where}: {_missing_label(path, fmt, row, label_field)}")
        rows += 1
        yield row
    if rows == 0:
        raise DataError(f"{path}: no examples (the file has no data rows)")


def read_file(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    require_labels: bool = True,
) -> Examples:
    """Read one split from a data file of any supported format into memory (see `iter_file`)."""
    return Examples.collect(iter_file(path, text_field, label_field, require_labels), str(path))


def read_jsonl(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    require_labels: bool = True,
) -> Examples:
    """Read a JSON Lines file (`.jsonl` / `.jsonl.gz`); the same as `read_file`."""
    return read_file(path, text_field, label_field, require_labels)


def label_str(value, names: list[str] | None = None) -> str | None:
    """The one label rule: a string as written, an integer as its digits (a ClassLabel id as its name); None
    (or a hidden ClassLabel -1) is None; booleans, floats and the rest are refused (ValueError)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a string or an integer, got {value!r}")
    if isinstance(value, int) and names is not None:
        if value < 0:
            return None  # hidden label (GLUE test splits)
        if value >= len(names):
            raise ValueError(f"class id {value} is out of range for the {len(names)} class names")
        return names[value]
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty")
    return str(value)


def text_problem(value, field: str) -> str | None:
    """What is wrong with a text value (None if it is a usable text)."""
    if value is None:
        return f"field '{field}' is null; expected a string"
    if not isinstance(value, str):
        return f"field '{field}' must be a string, got {type(value).__name__} {value!r}"
    if not value.strip():
        return f"field '{field}' is empty"
    return None


def surrogate_problem(text: str, field: str) -> str:
    """Why a text with a lone surrogate (e.g. a JSON `\\ud800` escape without its pair) is refused."""
    found = _SURROGATE.search(text)
    return (
        f"field '{field}' has a lone surrogate (U+{ord(found.group()):04X}) at character {found.start()}: "
        "not valid Unicode text; fix the text or the tool that escaped it"
    )


def class_names(feature) -> list[str] | None:
    """The names of a `datasets.ClassLabel` feature, else None."""
    return list(feature.names) if getattr(feature, "names", None) else None


# -- one reader per format -------------------------------------------------------------------------


def _json_rows(
    path: Path, fmt: str, text_field: str, label_field: str | None, require_labels: bool
) -> Iterator[Row]:
    """JSON Lines (one object a line, blank lines skipped), or a JSON array of objects (parsed whole)."""
    lines = _lines(path)
    for n, line in lines:  # noqa: B007 (the first non-blank line is used below)
        if line.strip():
            break
    else:
        return
    if line.lstrip().startswith("["):
        text = line + "".join(rest for _, rest in lines)
        try:
            objects = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{n - 1 + err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        if not isinstance(objects, list):
            raise DataError(f"{path}: expected a JSON array of objects")
        escaped = "\\u" in text
        for i, obj in enumerate(objects):
            yield _object_row(obj, path, 0, i, text_field, label_field, escaped)
        return
    i, first = 0, (n, line)
    for n, line in _chain_first(first, lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{n}: malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        yield _object_row(obj, path, n, i, text_field, label_field, "\\u" in line)
        i += 1


def _object_row(
    obj, path: Path, line: int, i: int, text_field: str, label_field: str | None, escaped: bool
) -> Row:
    """One JSON value as a row (`escaped`: the line has `\\u` escapes, the only way to a lone surrogate)."""
    try:
        text = obj[text_field]
        label = None if label_field is None else label_str(obj.get(label_field))
    except (TypeError, KeyError, ValueError, AttributeError):
        text = label = None  # the checks below say what is wrong
    problem = None
    if text.__class__ is not str or not text.strip() or (escaped and _SURROGATE.search(text)):
        problem = _object_problem(obj, text_field, label_field)
    if problem:
        where = f"{path}:{line}" if line else f"{path}, row {i + 1}"
        raise DataError(f"{where}: {problem}")
    return Row(text, label, str(path), line, i)


def _object_problem(obj, text_field: str, label_field: str | None) -> str | None:
    """What is wrong with one JSON row (None: nothing)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_json_kind(obj)}"
    if text_field not in obj:
        return (
            f"missing field '{text_field}' (keys present: {sorted(obj)}); "
            "name the text field (data.text_field)"
        )
    text = obj[text_field]
    problem = text_problem(text, text_field)
    if problem is None and _SURROGATE.search(text):
        problem = surrogate_problem(text, text_field)
    if problem is None and label_field is not None:
        try:
            label_str(obj.get(label_field))
        except ValueError as err:
            problem = f"field '{label_field}' {err}"
    return problem


def _csv_rows(
    path: Path, fmt: str, text_field: str, label_field: str | None, require_labels: bool
) -> Iterator[Row]:
    """CSV (quoted cells as `csv` / pandas write them) or TSV (unquoted, as GLUE writes it); every cell a string."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    lines = _lines(path)
    if fmt == "tsv":
        reader = csv.reader((line for _, line in lines), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(line for _, line in lines)
    header, start, i, warned = None, 1, 0, False
    try:
        for record in reader:
            if not record:  # a blank line
                start = reader.line_num + 1
                continue
            if header is None:
                header = record
                ti, li = _columns(path, header, text_field, label_field, require_labels)
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if record == header:
                raise DataError(
                    f"{path}:{line}: the header row {header} appears again inside the data "
                    "(files joined with `cat`?); remove the repeated header line"
                )
            if len(record) != len(header):
                raise DataError(f"{path}:{line}: {_width_problem(fmt, header, record)}")
            text = record[ti]
            if fmt == "tsv" and not warned:
                quoted = [c for c in (text, record[li] if li is not None else "") if _wrapped(c)]
                if quoted:
                    warned = True
                    log.warning(
                        "%s:%d: a cell is wrapped in quotes (%s); TSV is read unquoted, as GLUE writes "
                        "it, so the quotes stay in the text and labels: write the file without quoting "
                        "(pandas: quoting=csv.QUOTE_NONE) or save it as .csv",
                        path,
                        line,
                        quoted[0][:30],
                    )
            problem = text_problem(text, text_field)
            if problem:
                raise DataError(f"{path}:{line}: {problem}")
            label = record[li] if li is not None and record[li].strip() else None
            yield Row(text, label, str(path), line, i)
            i += 1
    except csv.Error as err:
        raise DataError(f"{path}:{start}: cannot read as {fmt.upper()} ({err})") from None


def _parquet_rows(
    path: Path, fmt: str, text_field: str, label_field: str | None, require_labels: bool
) -> Iterator[Row]:
    """Parquet, read in batches of the text and label columns only (ClassLabel ids as their names)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: cannot read as Parquet ({type(err).__name__}: {err})") from None
    names = pf.schema_arrow.names
    ti, li = _columns(path, names, text_field, label_field, require_labels)
    columns = [text_field] + ([label_field] if li is not None else [])
    class_ids = _parquet_class_names(pf, label_field) if li is not None else None
    i = 0
    try:
        batches = pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns)
        for batch in batches:
            texts = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if li is not None else [None] * len(texts)
            for text, value in zip(texts, labels):
                problem = text_problem(text, text_field)
                if problem:
                    raise DataError(f"{path}, row {i + 1}: {problem}")
                try:
                    label = label_str(value, class_ids)
                except ValueError as err:
                    raise DataError(f"{path}, row {i + 1}: field '{label_field}' {err}") from None
                yield Row(text, label, str(path), 0, i)
                i += 1
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read as Parquet ({type(err).__name__}: {err})") from None


# -- helpers ---------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a text file, gzipped or not; bad bytes and bad gzip data as `DataError`."""
    gz = path.suffix.lower() == ".gz"
    n = 0
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if n == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise DataError(
                        f"{path}:{n}: not valid UTF-8 ({bad.reason} at byte {bad.start}); "
                        "re-encode the file as UTF-8"
                    ) from None
    except gzip.BadGzipFile as err:
        raise DataError(
            f"{path}: not gzip data ({err}); the name ends in .gz: compress the file, or drop .gz from its name"
        ) from None
    except (EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: the gzip data is cut off or damaged after line {n} ({err}); fetch or compress it again"
        ) from None


def _chain_first(first, rest):
    yield first
    yield from rest


def _columns(
    path: Path, names: list[str], text_field: str, label_field: str | None, require_labels: bool
):
    """Positions of the text and label columns (label None when absent)."""
    for name, key, needed in (
        (text_field, "text", True),
        (label_field, "label", require_labels and label_field is not None),
    ):
        if needed and name not in names:
            raise DataError(
                f"{path}: no field '{name}' (fields: {list(names)}); set data.{key}_field to the {key} column"
            )
    li = names.index(label_field) if label_field is not None and label_field in names else None
    return names.index(text_field), li


def _wrapped(cell: str) -> bool:
    return len(cell) > 1 and cell[0] == cell[-1] == '"'


def _width_problem(fmt: str, header: list[str], record: list[str]) -> str:
    found = f"expected {len(header)} fields as in the header {header}, found {len(record)}"
    if fmt == "csv" and any("\n" in cell for cell in record):
        return f"{found}: a quoted cell runs over {sum(c.count(chr(10)) for c in record)} line(s); is a closing quote missing?"
    if fmt == "tsv" and any(cell.startswith('"') for cell in record):
        opened = record[-1].startswith('"') and not record[-1].endswith('"')
        cause = "a newline inside a quoted cell" if opened else "a tab inside a quoted cell"
        return (
            f"{found}, probably {cause}: TSV is read unquoted, as GLUE writes it, so quotes do not "
            "protect tabs or newlines; save the file as CSV, or remove them from the cells"
        )
    return found


def _missing_label(path: Path, fmt: str, row: Row, label_field: str | None) -> str:
    if fmt in ("csv", "tsv"):
        return f"field '{label_field}' is empty"
    if fmt == "json" and row.line:
        obj = _json_line(path, row.line)
        if isinstance(obj, dict) and label_field not in obj:
            return f"missing field '{label_field}' (keys present: {sorted(obj)})"
    return f"field '{label_field}' is null; expected a label"


def _json_line(path: Path, line: int):
    """The JSON value on line `line` (read again for a message only)."""
    for n, text in _lines(path):
        if n == line:
            try:
                return json.loads(text)
            except ValueError:
                return None
    return None


def _parquet_class_names(pf, label_field: str) -> list[str] | None:
    """ClassLabel names from the `datasets` features a Parquet file carries in its metadata."""
    meta = (pf.schema_arrow.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label_field]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return list(names) if names else None


def _json_kind(value) -> str:
    kinds = {type(None): "null", bool: "boolean", str: "string", list: "array"}
    return kinds.get(type(value), type(value).__name__)
