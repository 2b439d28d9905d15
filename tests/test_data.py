"""Data sources, the JSONL reader's errors, held-out splits, the label map, batching and streaming."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from layerfusion.data.datamodule import Collator, TextClassificationDataModule
from layerfusion.data.jsonl import DataError, read_jsonl
from layerfusion.data.sources import BUNDLED_DIR, NAMED_DATASETS, sorted_labels, stratified_holdout
from layerfusion.data.stream import ShardedStream
from layerfusion.encoders.frozen import EncoderSpec


def _write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok", "label": 1', r"bad\.jsonl:2: malformed JSON"),
        ('{"label": "1"}', r"bad\.jsonl:2: missing field 'text'"),
        ('{"text": "fine"}', r"bad\.jsonl:2: missing field 'label'"),
        ('{"text": "  ", "label": "1"}', r"bad\.jsonl:2: field 'text' is empty"),
        ('{"text": 3, "label": "1"}', r"bad\.jsonl:2: field 'text' must be a string"),
        ('["a", "b"]', r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", ['{"text": "good", "label": "0"}', line])
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_reader_rejects_non_utf8_and_empty_files(tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"text": "ok", "label": "0"}\n{"text": "caf\xe9", "label": "1"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        read_jsonl(bad)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_reader_reads_gzip_ints_and_optional_labels(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write('{"text": "a", "label": 3}\n\n{"text": "b"}\n')
    ex = read_jsonl(path, require_labels=False)
    assert ex.texts == ["a", "b"] and ex.labels == ["3", None] and ex.lines == [1, 3]


def test_bundled_datasets_equal_the_shared_copies(shared_data):
    for name in NAMED_DATASETS:
        for gz in sorted((BUNDLED_DIR / name).glob("*.jsonl.gz")):
            assert (
                gzip.decompress(gz.read_bytes()) == (shared_data / name / gz.name[:-3]).read_bytes()
            ), gz


def test_unknown_dataset_lists_the_known_names():
    dm = TextClassificationDataModule(dataset="sst3")
    with pytest.raises(DataError, match=r"unknown dataset 'sst3'.*sst2, sst2_glue, mr, r8, r52"):
        _ = dm.label_names


def test_missing_split_file(tmp_path):
    (tmp_path / "only_test").mkdir()
    _write(tmp_path / "only_test" / "test.jsonl", [{"text": "a", "label": "0"}])
    with pytest.raises(DataError, match=r"only_test: no train\.jsonl"):
        _ = TextClassificationDataModule(dataset=str(tmp_path / "only_test")).label_names
    (tmp_path / "sst2").mkdir()
    _write(
        tmp_path / "sst2" / "train.jsonl",
        [{"text": "a", "label": "0"}, {"text": "b", "label": "1"}],
    )
    with pytest.raises(DataError, match=r"missing dev\.jsonl for the val split of 'sst2'"):
        _ = TextClassificationDataModule(dataset="sst2", data_dir=str(tmp_path)).label_names


def test_unseen_test_label_names_file_and_line(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _write(d / "train.jsonl", [{"text": f"t{i}", "label": str(i % 2)} for i in range(10)])
    _write(d / "test.jsonl", [{"text": "x", "label": "0"}, {"text": "y", "label": "7"}])
    dm = TextClassificationDataModule(dataset=str(d))
    with pytest.raises(DataError, match=r"test\.jsonl:2: label '7' does not occur in train"):
        dm.setup("test")


def test_single_label_train_is_rejected(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _write(d / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(DataError, match="1 distinct label"):
        _ = TextClassificationDataModule(dataset=str(d)).label_names


def test_label_map_is_sorted_numerically_when_numeric():
    assert sorted_labels(["10", "9", "1", None]) == ["1", "9", "10"]
    assert sorted_labels(["earn", "acq", "trade"]) == ["acq", "earn", "trade"]


def test_stratified_holdout_is_seeded_disjoint_and_stratified():
    labels = ["a"] * 90 + ["b"] * 10 + ["c"]
    keep, held = stratified_holdout(labels, 0.2, seed=1)
    assert sorted(keep + held) == list(range(len(labels))) and not set(keep) & set(held)
    assert Counter(labels[i] for i in held) == {"a": 18, "b": 2}  # a singleton class stays in train
    assert (keep, held) == stratified_holdout(labels, 0.2, seed=1)
    assert held != stratified_holdout(labels, 0.2, seed=2)[1]


def test_named_dataset_splits_never_touch_test(shared_data):
    dm = TextClassificationDataModule(dataset="r8", data_dir=str(shared_data), val_fraction=0.1)
    dm.setup("fit")
    test_texts = set(read_jsonl(shared_data / "r8" / "test.jsonl").texts)
    train, val = dm.splits["train"], dm.splits["val"]
    assert len(train) + len(val) == 5485 and 540 <= len(val) <= 560
    assert not (set(val.texts) - set(read_jsonl(shared_data / "r8" / "train.jsonl").texts))
    assert (
        len(test_texts & set(val.texts)) <= len(test_texts & set(train.texts)) + 0
    )  # val comes from train only
    assert dm.label_names == sorted(set(train.labels))
    dm.setup("test")
    assert len(dm.splits["test"]) == 2189


def test_sst2_glue_uses_glue_validation_as_test():
    dm = TextClassificationDataModule(dataset="sst2_glue", max_train_samples=None)
    dm.setup("test")
    assert len(dm.splits["test"]) == 872


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
    import datasets

    path = _write(
        tmp_path / "train.jsonl", [{"text": f"t{i}", "label": str(i % 3)} for i in range(103)]
    )
    source = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
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
