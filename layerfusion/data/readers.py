"""Reading one split (JSON Lines, JSON, CSV, TSV, Parquet, a `datasets.Dataset`) into `Examples`.

Files are parsed by `datasets`' own builders (json, csv, parquet). When a builder fails, or a row is
bad, the file is scanned only to name the line or row: every error names the file and where in it.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import gzip
import io
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from layerfusion.errors import LayerFusionError

# file suffix -> format; the text formats may also be gzipped (`.jsonl.gz`, `.csv.gz`, ...)
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_SURROGATE = re.compile("[\\ud800-\\udfff]")  # half of a UTF-16 pair: no character, not encodable


class DataError(LayerFusionError, ValueError):
    """Bad data in a source: the message names the file, the line or row and what was expected."""


@dataclass
class Examples:
    """The texts and (string) labels of one split, with where they came from."""

    texts: list[str]
    labels: list[str | None]
    source: str
    locate: Callable[[int], str] | None = None  # row -> "file:line" (computed on demand)
    rows: list[int] | None = None  # row in `source` of each example, when a subset

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, i: int) -> str:
        """Where example `i` is: `file:line` for line-based files, else `source, row N` (1-based)."""
        row = self.rows[i] if self.rows is not None else i
        return self.locate(row) if self.locate else f"{self.source}, row {row + 1}"

    def take(self, rows: list[int]) -> Examples:
        """The examples at `rows`, remembering where each came from."""
        orig = [self.rows[i] for i in rows] if self.rows is not None else list(rows)
        texts, labels = [self.texts[i] for i in rows], [self.labels[i] for i in rows]
        return Examples(texts, labels, self.source, self.locate, orig)


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


def load_file(path: Path, fmt: str, text_field: str, label_field: str, streaming: bool = False):
    """Load one file with `datasets`' builder for `fmt` (a `Dataset`, or an `IterableDataset` when streaming)."""
    import datasets

    name, kwargs = "json", {}
    if fmt in ("csv", "tsv"):
        # every cell as written (no "01" -> 1, no "NA" -> NaN); a leading byte-order mark dropped
        name = "csv"
        kwargs = dict(
            encoding="utf-8-sig",
            keep_default_na=False,
            converters={text_field: str, label_field: str},
        )
        if fmt == "tsv":  # plain tab-separated values, as GLUE's files: no quoting
            kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
    elif fmt == "parquet":
        name = "parquet"
    else:
        _refuse_null_rows(path, text_field, label_field)
    if streaming:
        with quiet_builders():
            return datasets.load_dataset(
                name, data_files=str(path), split="train", streaming=True, **kwargs
            )
    # read into memory through a throw-away cache: no Arrow copy of every data file left in ~/.cache
    with tempfile.TemporaryDirectory(prefix="layerfusion-read-") as tmp, quiet_builders():
        return datasets.load_dataset(
            name, data_files=str(path), split="train", cache_dir=tmp, keep_in_memory=True, **kwargs
        )


def read_file(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    require_labels: bool = True,
) -> Examples:
    """Read one split from a data file of any supported format; bad data raises `DataError` naming file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = file_format(path)
    try:
        ds = load_file(path, fmt, text_field, label_field)
        exact = _mixed_json_columns(ds, path, (text_field, label_field)) if fmt == "json" else {}
        return to_examples(
            ds, str(path), text_field, label_field, require_labels, locator(path, fmt), exact
        )
    except DataError:
        raise
    except Exception as err:  # builders raise many types (ArrowInvalid, ParserError, ...)
        raise diagnose(path, fmt, err, text_field, label_field) from err


def read_jsonl(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    require_labels: bool = True,
) -> Examples:
    """Read a JSON Lines file (`.jsonl` / `.jsonl.gz`); the same as `read_file`."""
    return read_file(path, text_field, label_field, require_labels)


def to_examples(
    ds,
    source: str,
    text_field: str,
    label_field: str,
    require_labels: bool = True,
    locate: Callable[[int], str] | None = None,
    exact: dict[str, list] | None = None,
) -> Examples:
    """Check and convert a `datasets.Dataset` split: string texts, labels as strings (ClassLabel ids as names)."""
    where = locate or (lambda i: f"{source}, row {i + 1}")
    columns = list(ds.column_names)
    if len(ds) == 0:
        raise DataError(f"{source}: no examples (the split is empty)")
    if text_field not in columns:
        raise DataError(
            f"{source}: no field '{text_field}' (fields: {columns}); set data.text_field to the text column"
        )
    has_labels = label_field in columns
    cols = ds.select_columns([text_field, label_field] if has_labels else [text_field]).to_dict()
    cols.update(exact or {})
    texts = cols[text_field]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where(i)}: {_field_problem(text, text_field, 'a string', where(i))}")
        if _SURROGATE.search(text):
            raise DataError(f"{where(i)}: {surrogate_problem(text, text_field)}")
    if not has_labels:
        if require_labels:
            raise DataError(
                f"{source}: no field '{label_field}' (fields: {columns}); set data.label_field to the label column"
            )
        return Examples(texts, [None] * len(texts), source, locate)
    names = class_names(ds.features.get(label_field))
    labels: list[str | None] = []
    for i, value in enumerate(cols[label_field]):
        try:
            labels.append(label_str(value, names))
        except ValueError as err:
            raise DataError(f"{where(i)}: field '{label_field}' {err}") from None
    if require_labels and None in labels:
        if all(lab is None for lab in labels) and names:
            raise DataError(
                f"{source}: no gold labels (every '{label_field}' is hidden, -1, as in GLUE test splits); "
                "evaluate on a labelled split, or use `predict`"
            )
        i = labels.index(None)
        raise DataError(f"{where(i)}: {_field_problem(None, label_field, 'a label', where(i))}")
    return Examples(texts, labels, source, locate)


def label_str(value, names: list[str] | None = None) -> str | None:
    """A label as a string: ClassLabel ids become their names, integers their digits; None (or a hidden -1) None."""
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


def class_names(feature) -> list[str] | None:
    """The names of a `datasets.ClassLabel` feature, else None."""
    return list(feature.names) if getattr(feature, "names", None) else None


@contextlib.contextmanager
def quiet_builders() -> Iterator[None]:
    """No `datasets` progress bars while a split is read."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _mixed_json_columns(ds, path: Path, fields: tuple[str, ...]) -> dict[str, list]:
    """Exact values of columns `datasets` typed as mixed JSON (strings and numbers in one column).

    Its `Json` feature decodes the stored strings as JSON, so the string labels "00" and "false" would come
    back as 0 and False: such columns are read from the rows themselves.
    """
    import datasets

    mixed = [f for f in fields if isinstance(ds.features.get(f), datasets.Json)]
    if not mixed:
        return {}
    text = _text(path)
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    return {f: [row.get(f) for row in rows] for f in mixed}


def _refuse_null_rows(path: Path, text_field: str, label_field: str) -> None:
    """A row that is a bare `null` crashes pyarrow's JSON reader (26.0: a segfault when it starts a block)."""
    raw = _bytes(path)
    if raw.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(
        b"["
    ):  # an array: the builder parses it whole anyway
        found = _json_problem(
            path, raw.decode("utf-8-sig", errors="replace"), text_field, label_field
        )
        if found:
            raise found
        return
    found = re.search(rb"(?m)^(?:\xef\xbb\xbf)?[ \t\r]*null[ \t\r]*$", raw)
    if found:
        line = raw.count(b"\n", 0, found.start()) + 1
        raise DataError(f"{path}:{line}: expected a JSON object, got null")


def stream_error(name: str, err: Exception, text_field: str, label_field: str) -> DataError:
    """A `DataError` for a failure while streaming `name` (a file: naming the line)."""
    path = Path(name)
    if path.is_file() and path.suffix:
        return diagnose(path, file_format(path), err, text_field, label_field)
    return DataError(f"{name}: cannot read the stream ({type(err).__name__}: {err})")


def _drop_failed_to(record: logging.LogRecord) -> bool:
    """The builders log "Failed to ..." before raising; we re-raise with the file and line instead."""
    return not str(record.msg).startswith(
        (
            "Failed to load JSON from file",
            "Failed to read file",
            "Failed to convert pandas DataFrame",
        )
    )


# -- where a row is, and why a file failed --------------------------------------------------------


def locator(path: Path, fmt: str) -> Callable[[int], str] | None:
    """row -> `file:line` for line-based files (JSON Lines, CSV, TSV); None for the others."""
    if fmt == "parquet":
        return None
    # a partial of a module-level function, not a closure: Examples travel to ddp_spawn workers
    return functools.partial(_locate, path, fmt)


def _locate(path: Path, fmt: str, row: int) -> str:
    """`file:line` of data row `row` (`file, row N` where lines do not apply)."""
    line = _row_line(path, fmt, row)
    return f"{path}:{line}" if line else f"{path}, row {row + 1}"


def _row_line(path: Path, fmt: str, row: int) -> int | None:
    """The 1-based line where data row `row` starts (None in a JSON array)."""
    text = _text(path)
    if fmt == "json":
        if text.lstrip().startswith("["):
            return None
        rows = (n for n, line in enumerate(text.split("\n"), 1) if line.strip())
    else:
        reader = _csv_reader(text, fmt)
        next(reader, None)  # header
        rows = (_line_of(reader, rec) for rec in reader)
    for i, line in enumerate(rows):
        if i == row:
            return line
    return None


def _line_of(reader, record) -> int:
    return reader.line_num - record_lines(record) + 1


def record_lines(record: list[str]) -> int:
    """Physical lines a CSV record spans."""
    return 1 + sum(cell.count("\n") for cell in record)


def diagnose(
    path: Path, fmt: str, err: Exception, text_field: str = "text", label_field: str = "label"
) -> DataError:
    """A `DataError` naming the line or row that made a builder fail (or the builder's reason)."""
    cause = err.__cause__ or err.__context__ or err
    raw = _bytes(path)
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    if not raw.strip():
        return DataError(f"{path}: no examples (the file is empty)")
    if fmt != "parquet":
        for n, line in enumerate(raw.split(b"\n"), 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DataError(
                    f"{path}:{n}: not valid UTF-8 ({bad.reason} at byte {bad.start}); re-encode the file as UTF-8"
                )
        found = (
            _json_problem(path, raw.decode(), text_field, label_field)
            if fmt == "json"
            else _csv_problem(path, fmt)
        )
        if found:
            return found
    kind = {"json": "JSON", "csv": "CSV", "tsv": "TSV", "parquet": "Parquet"}[fmt]
    return DataError(f"{path}: cannot read as {kind} ({type(cause).__name__}: {cause})")


def _json_problem(path: Path, text: str, text_field: str, label_field: str) -> DataError | None:
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            return DataError(
                f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
            )
        for i, obj in enumerate(rows):
            problem = _object_problem(obj, text_field, label_field)
            if problem:
                return DataError(f"{path}, row {i + 1}: {problem}")
        return None
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            return DataError(f"{path}:{n}: malformed JSON ({err.msg} at column {err.colno})")
        problem = _object_problem(obj, text_field, label_field)
        if problem:
            return DataError(f"{path}:{n}: {problem}")
    return None


def _object_problem(obj, text_field: str, label_field: str) -> str | None:
    """What is wrong with one JSON row (types only: the builder could not make columns of it)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    text = obj.get(text_field)
    if text is not None and not isinstance(text, str):
        return f"field '{text_field}' must be a string, got {type(text).__name__} {text!r}"
    if isinstance(text, str) and _SURROGATE.search(text):
        return surrogate_problem(text, text_field)
    try:
        label_str(obj.get(label_field))
    except ValueError as err:
        return f"field '{label_field}' {err}"
    return None


def surrogate_problem(text: str, field: str) -> str:
    """Why a text with a lone surrogate (e.g. a JSON `\\ud800` escape without its pair) is refused."""
    found = _SURROGATE.search(text)
    return (
        f"field '{field}' has a lone surrogate (U+{ord(found.group()):04X}) at character {found.start()}: "
        "not valid Unicode text; fix the text or the tool that escaped it"
    )


def _csv_problem(path: Path, fmt: str) -> DataError | None:
    reader = _csv_reader(_text(path), fmt)
    header = next(reader, None)
    for record in reader:
        if record and len(record) != len(header):
            return DataError(
                f"{path}:{_line_of(reader, record)}: expected {len(header)} fields as in the header "
                f"{header}, found {len(record)}"
            )
    return None


def _csv_reader(text: str, fmt: str):
    if fmt == "tsv":
        return csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(io.StringIO(text, newline=""))


def _bytes(path: Path) -> bytes:
    with (gzip.open if path.suffix.lower() == ".gz" else open)(path, "rb") as fh:
        return fh.read()


def _text(path: Path) -> str:
    return _bytes(path).decode("utf-8-sig", errors="replace")


def _field_problem(value, field: str, expected: str, where: str) -> str:
    """What is wrong with a field value (for JSON: missing vs null, read from the line itself)."""
    if value is None:
        obj = _json_at(where)
        if isinstance(obj, dict) and field not in obj:
            return f"missing field '{field}' (keys present: {sorted(obj)})"
        return f"field '{field}' is null; expected {expected}"
    if not isinstance(value, str):
        return f"field '{field}' must be a string, got {type(value).__name__} {value!r}"
    return f"field '{field}' is empty"


def _json_at(where: str):
    """The JSON object on a `file:line` line, or None."""
    path, _, line = where.rpartition(":")
    if not line.isdigit() or not path.lower().endswith(
        (".jsonl", ".json", ".jsonl.gz", ".json.gz")
    ):
        return None
    try:
        return json.loads(_text(Path(path)).split("\n")[int(line) - 1])
    except (ValueError, IndexError):
        return None


for _module in ("json", "csv"):
    logging.getLogger(f"datasets.packaged_modules.{_module}.{_module}").addFilter(_drop_failed_to)
