"""Property-based fuzzing of the JSON Lines reader and the collate function (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfusion.data.datamodule import Collator
from layerfusion.data.readers import DataError, read_file, read_jsonl

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
READER_SETTINGS = settings(SETTINGS, max_examples=80)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=5,
)
nonblank = st.text(min_size=1).filter(str.strip)
valid_rows = st.fixed_dictionaries(
    {
        "text": nonblank,
        "label": st.one_of(nonblank, st.integers(min_value=-(2**62), max_value=2**62)),
    }
)
rows = st.one_of(
    valid_rows,
    st.dictionaries(st.sampled_from(["text", "label", "other"]), json_values, max_size=3),
    json_values,
)


@READER_SETTINGS
@given(good=st.lists(valid_rows, min_size=1, max_size=8), bom=st.booleans())
def test_valid_rows_always_parse(tmp_path, good, bom):
    """Any file of well-formed rows reads back exactly (texts as written, labels as strings)."""
    path = tmp_path / "good.jsonl"
    body = "\n".join(json.dumps(r, ensure_ascii=bool(len(good) % 2)) for r in good)
    path.write_bytes(("\ufeff" if bom else "").encode() + body.encode("utf-8"))
    ex = read_jsonl(path)
    assert ex.texts == [r["text"] for r in good]
    assert ex.labels == [str(r["label"]) for r in good]


@READER_SETTINGS
@given(
    lines=st.lists(
        st.one_of(rows.map(json.dumps).map(str.encode), st.binary(max_size=40)), max_size=8
    )
)
def test_reader_returns_examples_or_a_data_error(tmp_path, lines):
    """Arbitrary bytes: either examples or a `DataError` that names the file, never another exception."""
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        ex = read_jsonl(path)
    except DataError as err:
        assert str(err).startswith(str(path))  # every error names the file (and line)
        return
    assert len(ex.texts) == len(ex.labels) > 0
    assert all(isinstance(t, str) and t.strip() for t in ex.texts)
    assert all(isinstance(lab, str) for lab in ex.labels)


@READER_SETTINGS
@given(
    cells=st.lists(
        st.one_of(
            st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=2, max_size=2),
            st.lists(
                st.text(alphabet=st.sampled_from('ab ,\t"\n\r\ufeff'), max_size=6), max_size=4
            ),
        ),
        max_size=6,
    ),
    suffix=st.sampled_from([".csv", ".tsv", ".csv.gz"]),
)
def test_delimited_files_give_examples_or_a_data_error(tmp_path, cells, suffix):
    """CSV / TSV of arbitrary quotes, separators and newlines: examples whose line numbers are real lines
    of the file, or a `DataError` that names the file, never another exception."""
    import gzip

    sep = "\t" if suffix == ".tsv" else ","
    body = "text" + sep + "label\n" + "\n".join(sep.join(row) for row in cells)
    path = tmp_path / f"fuzz{suffix}"
    data = body.encode("utf-8")
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    try:
        ex = read_file(path)
    except DataError as err:
        assert str(err).startswith(str(path))
        return
    n_lines = body.count("\n") + 1
    lines = []
    for i in range(len(ex)):
        where = ex.where(i)
        assert where.startswith(f"{path}:") and 2 <= int(where.rsplit(":", 1)[1]) <= n_lines
        lines.append(int(where.rsplit(":", 1)[1]))
    if not any(ch in cell for row in cells for cell in row for ch in '"\n\r\ufeff'):
        # one record per line: example k is the k-th non-empty line after the header
        assert lines == [i + 2 for i, row in enumerate(cells) if sep.join(row)]
    assert all(t.strip() for t in ex.texts) and all(lab and lab.strip() for lab in ex.labels)


@pytest.fixture(scope="module")
def tokenizers(minilm_dir):
    from transformers import AutoTokenizer

    return {"minilm": (AutoTokenizer.from_pretrained(minilm_dir), 16)}


@SETTINGS
@given(texts=st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=6))
def test_collate_pads_truncates_and_keeps_rows(tokenizers, texts):
    batch = Collator(tokenizers)(
        [{"index": i, "text": t, "label": i % 2} for i, t in enumerate(texts)]
    )
    ids, mask = batch["inputs"]["minilm"]["input_ids"], batch["inputs"]["minilm"]["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(texts) and 2 <= ids.shape[1] <= 16
    assert (mask.sum(1) >= 2).all()  # at least [CLS] and [SEP], even for text the tokenizer drops
    assert batch["index"].tolist() == list(range(len(texts)))


def test_a_megabyte_text_is_truncated_not_exploded(tokenizers):
    batch = Collator(tokenizers)([{"index": 0, "text": "word " * 200_000, "label": 0}])
    assert batch["inputs"]["minilm"]["input_ids"].shape == (1, 16)
