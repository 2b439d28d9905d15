"""Data sources, the reader's errors, held-out splits, subsets, the label map, batching and streaming."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from layerfusion.data.datamodule import Collator, TextClassificationDataModule
from layerfusion.data.readers import DataError, read_file, read_jsonl
from layerfusion.data.sources import (
    BUNDLED_DIR,
    NAMED_DATASETS,
    path_source,
    sorted_labels,
    stratified_holdout,
    stratified_subset,
)
from layerfusion.data.stream import ShardedStream
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import ConfigError


def _write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok", "label": 1', r"bad\.jsonl:3: malformed JSON"),
        ('{"label": "1"}', r"bad\.jsonl:3: missing field 'text' \(keys present: \['label'\]\)"),
        ('{"text": "fine"}', r"bad\.jsonl:3: missing field 'label' \(keys present: \['text'\]\)"),
        ('{"text": "fine", "label": null}', r"bad\.jsonl:3: field 'label' is null"),
        ('{"text": "fine", "label": ""}', r"bad\.jsonl:3: field 'label' is empty"),
        (
            '{"text": "fine", "label": 1.5}',
            r"bad\.jsonl:3: field 'label' must be a string or an integer",
        ),
        ('{"text": "  ", "label": "1"}', r"bad\.jsonl:3: field 'text' is empty"),
        ('{"text": 3, "label": "1"}', r"bad\.jsonl:3: field 'text' must be a string, got int"),
        ('["a", "b"]', r"bad\.jsonl:3: expected a JSON object"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, line, message):
    # line 2 is blank: line numbers count the file's lines, not the rows
    path = _write(tmp_path / "bad.jsonl", ['{"text": "good", "label": "0"}', "", line])
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_reader_rejects_non_utf8_and_empty_files(tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"text": "ok", "label": "0"}\n{"text": "caf\xe9", "label": "1"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        read_jsonl(bad)
    for content in ("", "\n\n"):
        (tmp_path / "empty.jsonl").write_text(content)
        with pytest.raises(DataError, match=r"empty\.jsonl: no examples"):
            read_jsonl(tmp_path / "empty.jsonl")


def test_reader_reads_gzip_ints_bom_and_optional_labels(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b'\xef\xbb\xbf{"text": "a", "label": 3}\n\n{"text": "b"}\n')
    ex = read_jsonl(path, require_labels=False)
    assert ex.texts == ["a", "b"] and ex.labels == ["3", None]
    assert (ex.where(0), ex.where(1)) == (f"{path}:1", f"{path}:3")


def test_bundled_datasets_match_their_published_checksums(shared_data):
    """The bundled .jsonl.gz files decompress to the bytes the data README lists (and to ../shared/data)."""
    listed = dict(
        (m.group(2), m.group(1))
        for m in re.finditer(
            r"^([0-9a-f]{64})\s+\d+\s+(\S+)$", (BUNDLED_DIR / "README.md").read_text(), re.M
        )
    )
    bundled = {
        f"{name}/{gz.name[:-3]}": gzip.decompress(gz.read_bytes())
        for name in NAMED_DATASETS
        for gz in (BUNDLED_DIR / name).glob("*.jsonl.gz")
    }
    assert len(listed) == len(bundled) == 11
    for rel, data in bundled.items():
        assert hashlib.sha256(data).hexdigest() == listed[rel], rel
        assert (shared_data / rel).read_bytes() == data, rel


def test_unknown_dataset_lists_the_known_names():
    dm = TextClassificationDataModule(dataset="sst3")
    with pytest.raises(DataError, match=r"unknown dataset 'sst3'.*sst2, sst2_glue, mr, r8, r52"):
        _ = dm.label_names


def test_missing_split_file(tmp_path):
    (tmp_path / "only_test").mkdir()
    _write(tmp_path / "only_test" / "test.jsonl", [{"text": "a", "label": "0"}])
    with pytest.raises(DataError, match=r"only_test: no train file"):
        _ = TextClassificationDataModule(dataset=str(tmp_path / "only_test")).label_names
    (tmp_path / "sst2").mkdir()
    _write(
        tmp_path / "sst2" / "train.jsonl",
        [{"text": "a", "label": "0"}, {"text": "b", "label": "1"}],
    )
    with pytest.raises(DataError, match=r"missing dev\.jsonl for the val split of 'sst2'"):
        _ = TextClassificationDataModule(dataset="sst2", data_dir=str(tmp_path)).label_names


def _dir(tmp_path, **splits) -> Path:
    d = tmp_path / "d"
    d.mkdir(exist_ok=True)
    for split, rows in splits.items():
        _write(d / f"{split}.jsonl", rows)
    return d


def _train(n=10, k=2):
    return [{"text": f"t{i}", "label": str(i % k)} for i in range(n)]


def test_unseen_test_label_names_file_and_line(tmp_path):
    d = _dir(
        tmp_path, train=_train(), test=[{"text": "x", "label": "0"}, {"text": "y", "label": "7"}]
    )
    dm = TextClassificationDataModule(dataset=str(d))
    with pytest.raises(DataError, match=r"test\.jsonl:2: label '7' does not occur in train"):
        dm.setup("test")


def test_unknown_gold_label_in_predict_path_is_a_clear_error(tmp_path):
    d = _dir(tmp_path, train=_train())
    pred = _write(tmp_path / "pred.jsonl", [{"text": "x"}, {"text": "y", "label": "1 "}])
    dm = TextClassificationDataModule(dataset=str(d), predict_path=str(pred))
    with pytest.raises(
        DataError,
        match=r"pred\.jsonl:2: label '1 ' does not occur in train \(it differs from '1' only",
    ):
        dm.setup("predict")


def test_train_label_outside_given_labels_is_a_clear_error(tmp_path):
    d = _dir(tmp_path, train=_train(k=3))
    dm = TextClassificationDataModule(dataset=str(d), labels=["0", "1"])
    assert dm.label_names == ["0", "1"]  # as given: no scan of train
    with pytest.raises(
        DataError, match=r"train\.jsonl:3: label '2' does not occur in data\.labels"
    ):
        dm.setup("fit")


def test_single_label_train_is_rejected(tmp_path):
    d = _dir(tmp_path, train=[{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(DataError, match="1 distinct label"):
        _ = TextClassificationDataModule(dataset=str(d)).label_names


class _Hashed(str):
    """A string with a chosen hash: sets of these iterate in the order the hashes give."""

    def __new__(cls, text: str, h: int):
        obj = super().__new__(cls, text)
        obj.h = h
        return obj

    def __hash__(self) -> int:
        return self.h


def test_label_map_is_sorted_deterministically():
    assert sorted_labels(["10", "9", "1", None]) == ["1", "9", "10"]
    assert sorted_labels(["earn", "acq", "trade"]) == ["acq", "earn", "trade"]
    # equal as integers: ordered by their text, whatever the set iteration order (PYTHONHASHSEED)
    assert sorted_labels(["01", "1", "-1"]) == sorted_labels(["1", "-1", "01"]) == ["-1", "01", "1"]
    # every set iteration order a PYTHONHASHSEED can give, in this process: labels whose hash is chosen
    for hashes in itertools.permutations(range(3)):
        labels = [_Hashed(text, h) for text, h in zip(["01", "1", "-1"], hashes)]
        assert [str(v) for v in sorted_labels(labels)] == ["-1", "01", "1"], hashes
    with pytest.raises(
        DataError, match=r"labels 'pos' and 'pos ' differ only in surrounding whitespace"
    ):
        sorted_labels(["pos", "neg", "pos "])


def test_stratified_holdout_is_seeded_disjoint_and_stratified():
    labels = ["a"] * 90 + ["b"] * 10 + ["c"]
    keep, held = stratified_holdout(labels, 0.2, seed=1)
    assert sorted(keep + held) == list(range(len(labels))) and not set(keep) & set(held)
    assert Counter(labels[i] for i in held) == {"a": 18, "b": 2}  # a singleton class stays in train
    assert (keep, held) == stratified_holdout(labels, 0.2, seed=1)
    assert held != stratified_holdout(labels, 0.2, seed=2)[1]


def test_stratified_subset_keeps_every_class_and_the_shares(shared_data):
    labels = read_jsonl(shared_data / "r52" / "train.jsonl").labels
    rows = stratified_subset(labels, 500, seed=3)
    assert len(rows) == len(set(rows)) == 500 and rows == sorted(rows)
    counts = Counter(labels[i] for i in rows)
    assert len(counts) == 52  # a plain random sample of 500 keeps about 33 of R52's 52 classes
    full = Counter(labels)
    assert abs(counts["earn"] - 500 * full["earn"] / len(labels)) <= 1 + 52
    assert rows == stratified_subset(labels, 500, seed=3) != stratified_subset(labels, 500, seed=4)


@pytest.mark.parametrize("key", ["max_train_samples", "max_eval_samples"])
def test_non_positive_sample_limits_are_rejected(key):
    for bad in (-5, 0):
        with pytest.raises(ConfigError, match=f"data.{key} must be a positive number"):
            TextClassificationDataModule(**{key: bad})


def test_named_dataset_splits_never_touch_test(shared_data):
    dm = TextClassificationDataModule(dataset="r8", data_dir=str(shared_data), val_fraction=0.1)
    dm.setup("fit")
    train, val = dm.splits["train"], dm.splits["val"]
    full = read_jsonl(shared_data / "r8" / "train.jsonl")
    # train and val are disjoint row sets of train.jsonl that together cover it
    assert sorted(train.rows + val.rows) == list(range(len(full))) == list(range(5485))
    assert 540 <= len(val) <= 560
    assert val.texts == [full.texts[i] for i in val.rows]
    assert "test" not in dm.splits
    assert dm.label_names == sorted(set(train.labels))
    dm.setup("test")
    assert dm.splits["test"].texts == read_jsonl(shared_data / "r8" / "test.jsonl").texts


def test_sst2_glue_uses_glue_validation_as_test(shared_data):
    dm = TextClassificationDataModule(dataset="sst2_glue", data_dir=str(shared_data))
    dm.setup("fit")
    dm.setup("test")
    glue_dev = read_jsonl(shared_data / "sst2_glue" / "dev.jsonl").texts
    assert (
        dm.splits["test"].texts == glue_dev
    )  # the GLUE validation texts, not sst2/dev (same size)
    assert dm.splits["test"].texts != read_jsonl(shared_data / "sst2" / "dev.jsonl").texts
    assert not set(dm.splits["test"].texts) & set(dm.splits["val"].texts)
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 67349


def test_a_malformed_test_file_does_not_stop_fit(tmp_path):
    d = _dir(tmp_path, train=_train(40), test=['{"text": "broken'])
    dm = TextClassificationDataModule(dataset=str(d))
    dm.setup("fit")
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 40
    with pytest.raises(DataError, match=r"test\.jsonl:1: malformed JSON"):
        dm.setup("test")


def test_sample_limits_are_stratified_subsets(tmp_path):
    rows = [{"text": f"t{i}", "label": "rare" if i % 20 == 0 else "common"} for i in range(200)]
    d = _dir(tmp_path, train=rows, dev=rows[:100], test=rows[100:])
    dm = TextClassificationDataModule(dataset=str(d), max_train_samples=20, max_eval_samples=10)
    dm.setup("fit")
    dm.setup("test")
    assert Counter(dm.splits["train"].labels) == {"common": 19, "rare": 1}
    assert Counter(dm.splits["val"].labels) == {"common": 9, "rare": 1}
    assert Counter(dm.splits["test"].labels) == {"common": 9, "rare": 1}


def test_collator_pads_per_batch_per_encoder(tiny_models):
    specs = [
        EncoderSpec(tiny_models["bert"], max_length=8, alias="short"),
        EncoderSpec(tiny_models["gpt2"], max_length=32, alias="long"),
    ]
    dm = TextClassificationDataModule(encoders=specs, features="online")
    collate = Collator(dm.tokenizers())
    rows = [
        {"index": 0, "text": "tiny", "label": 0},
        {"index": 1, "text": "a much longer text " * 10, "label": 1},
    ]
    batch = collate(rows)
    assert batch["labels"].tolist() == [0, 1] and batch["index"].tolist() == [0, 1]
    assert batch["inputs"]["short"]["input_ids"].shape[1] == 8
    assert 8 < batch["inputs"]["long"]["input_ids"].shape[1] <= 32
    assert (
        batch["inputs"]["long"]["attention_mask"][0].sum()
        < batch["inputs"]["long"]["attention_mask"][1].sum()
    )
    assert "inputs" not in Collator(None)(rows)


def test_stream_shards_are_equal_disjoint_and_cover_the_stream(tmp_path):
    path = _write(
        tmp_path / "train.jsonl", [{"text": f"t{i}", "label": str(i % 3)} for i in range(103)]
    )
    source = path_source(str(path), "data.train_path")
    shards = []
    for rank in range(2):
        stream = ShardedStream(
            source, ["0", "1", "2"], "text", "label", seed=5, rank=rank, world_size=2
        )
        shards.append([row["text"] for row in stream])
    assert len(shards[0]) == len(shards[1]) == 51  # 103 rows: the last odd one is dropped
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 102
    again = ShardedStream(source, ["0", "1", "2"], "text", "label", seed=5, rank=0, world_size=2)
    assert [row["text"] for row in again] == shards[0]  # same seed, same order
    again.set_epoch(1)
    assert [row["text"] for row in again] != shards[0]


def test_read_file_names_the_format_it_cannot_read(tmp_path):
    with pytest.raises(DataError, match=r"data\.xlsx: unknown file type"):
        read_file(_write(tmp_path / "data.xlsx", ["x"]))
