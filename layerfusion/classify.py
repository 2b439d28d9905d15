"""`layerfusion classify MODEL [TEXT ...] [--file FILE]`: one JSON line per text, printed as each block is done.

Files are read with the readers training uses (JSON Lines, JSON, CSV, TSV, Parquet, gzipped text formats),
streamed in blocks of `BLOCK_ROWS` rows, so memory stays flat whatever the file size; `.txt` files and
standard input (`-`) hold one text per line.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from layerfusion.classifier import BLOCK_ROWS, Classifier, InputError, check_text
from layerfusion.errors import LayerFusionError

LINE_SUFFIXES = (".txt", ".txt.gz")  # one text per line


def add_encoder_options(parser: argparse.ArgumentParser) -> None:
    """`--compute-dtype` and `--trust-remote-code`, the encoder options of `classify` and `serve`."""
    from layerfusion.encoders.frozen import COMPUTE_DTYPES

    parser.add_argument(
        "--compute-dtype",
        default=None,
        choices=COMPUTE_DTYPES,
        help="precision of the encoders (default: as trained)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the encoders' model directories run their own Python code (a value stored in the "
        "model file is never used)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Classify the texts given as arguments, then those of `--file`; print one JSON line per text."""
    parser = argparse.ArgumentParser(
        prog="layerfusion classify",
        description="Classify texts with a trained model: a fit checkpoint (.ckpt) or a folder "
        "written by Classifier.save. Prints one JSON line per text: text, label, probabilities "
        "(in input order, flushed block by block). An empty or whitespace-only text is an error naming it.",
    )
    parser.add_argument(
        "model", metavar="CKPT_OR_DIR", help="a .ckpt file or a saved classifier folder"
    )
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    parser.add_argument(
        "--file",
        help="read texts from a file, as training reads it: JSON Lines, JSON, CSV, TSV, Parquet "
        "(the --text-field column; .gz allowed for the text formats), or .txt (one text per line, "
        "blank lines skipped); '-' reads standard input, one text per line",
    )
    parser.add_argument(
        "--text-field", default="text", help="field or column holding the text (default: text)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    add_encoder_options(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="at most this many texts per forward pass (default: no bound but the token budget)",
    )
    parser.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="at most this many padded tokens per forward pass (default: as feature extraction, 4096)",
    )
    args = parser.parse_args(argv)
    if not args.texts and not args.file:
        parser.error("no texts: give them as arguments or with --file")
    rows = read_inputs(args.texts, args.file, args.text_field)
    first = next(rows, None)  # read errors (missing file, no such column) before the model loads
    if first is None:
        raise LayerFusionError(f"--file {args.file}: no texts in it")
    kwargs = {
        "device": args.device,
        "compute_dtype": args.compute_dtype,
        "batch_size": args.batch_size,
        "trust_remote_code": args.trust_remote_code,
    }
    if args.token_budget is not None:
        kwargs["token_budget"] = args.token_budget
    model = Path(args.model)
    load = Classifier.load if model.is_dir() else Classifier.from_checkpoint
    clf = load(model, progress_bar=False, **kwargs)
    block: list[tuple[str, Callable[[], str]]] = [first]
    for row in rows:
        block.append(row)
        if len(block) == BLOCK_ROWS:
            _write(clf, block)
            block = []
    if block:
        _write(clf, block)
    return 0


def read_inputs(
    texts: Sequence[str], file: str | None, text_field: str
) -> Iterator[tuple[str, Callable[[], str]]]:
    """(text, where) of the argument texts, then of the file's rows; `where()` names the row."""
    for i, text in enumerate(texts):
        yield _checked(text, lambda i=i: f"argument {i + 1}")
    if file is None:
        return
    if file == "-" or file.lower().endswith(LINE_SUFFIXES):
        yield from _lines(file)
    else:
        yield from _rows(Path(file), text_field)


def _write(clf: Classifier, block: list[tuple[str, Callable[[], str]]]) -> None:
    """Classify one block and print its rows in order (flushed: a reader of the pipe sees them now)."""
    texts = [text for text, _ in block]
    rows = clf._dicts(clf._run(texts, clf._probs, lambda i: block[i][1]()))
    out = sys.stdout
    for text, row in zip(texts, rows, strict=True):
        out.write(json.dumps({"text": text, **row}, ensure_ascii=False) + "\n")
    out.flush()


def _checked(text, where: Callable[[], str]) -> tuple[str, Callable[[], str]]:
    if not isinstance(text, str):
        raise InputError(f"{where()}: the text is a {type(text).__name__} ({text!r}), not a string")
    if not text.strip():  # `where()` may scan the file: only for a text that is refused
        check_text(text, where())
    return text, where


def _lines(file: str) -> Iterator[tuple[str, Callable[[], str]]]:
    """One text per non-blank line of a text file or standard input, read line by line."""
    name = "standard input" if file == "-" else file
    try:
        if file == "-":
            raw = sys.stdin.buffer
        else:
            raw = (gzip.open if file.lower().endswith(".gz") else open)(file, "rb")
        with io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
            for number, line in enumerate(fh, start=1):
                text = line.removesuffix("\n").removesuffix("\r")
                if text.strip():
                    yield text, lambda n=number: f"{name}:{n}"
    except FileNotFoundError:
        raise LayerFusionError(f"--file {name}: not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LayerFusionError(f"--file {name}: cannot read it as UTF-8 text ({err})") from None


def _rows(path: Path, text_field: str) -> Iterator[tuple[str, Callable[[], str]]]:
    """The `text_field` of each row of a data file, streamed by the training readers (`iter_file`)."""
    from layerfusion.data import DataError, iter_file

    try:
        for row in iter_file(path, text_field, label_field=None):  # texts checked as in training
            yield row.text, lambda where=row.where: where
    except DataError as err:  # the readers name training's option; here it is --text-field
        raise DataError(str(err).replace("(data.text_field)", "(--text-field)")) from None
