"""Reading as users' files need it (issue 28, items 1-8 and the named datasets' label names): one reader for every
mode, only the text and label columns, flat memory when streaming, real line numbers, one-line errors."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import re
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.data.readers import DataError, read_file
from layerfusion.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _two_class(n: int, prefix: str = "t") -> list[dict]:
    return [{"text": f"{prefix}{i}", "label": "ab"[i % 2]} for i in range(n)]


# -- 1. a named dataset is not mixed with your own files; the documented data blocks run ---------------


def test_a_named_dataset_mixed_with_own_files_is_an_error_naming_both(tmp_path, shared_data):
    own = _jsonl(tmp_path / "mine.jsonl", _two_class(20))
    for extra in ({"train_path": str(own)}, {"data_files": {"validation": str(own)}}):
        dm = TextClassificationDataModule(dataset="sst2", data_dir=str(shared_data), **extra)
        key = "data.train_path" if "train_path" in extra else "data.data_files"
        with pytest.raises(ConfigError, match=rf"named dataset 'sst2' and {key} gives split files"):
            dm.setup("fit")
    # a directory of split files may have one split replaced (nothing named is mixed in)
    d = tmp_path / "d"
    d.mkdir()
    _jsonl(d / "train.jsonl", _two_class(20))
    dm = TextClassificationDataModule(dataset=str(d), test_path=str(own))
    dm.setup("test")
    assert len(dm.splits["test"]) == 20


def _write_any(path: Path, rows: list[dict]) -> None:
    """`rows` in the format `path`'s suffix names (a directory: as train.jsonl inside it)."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if not suffix:
        path.mkdir(parents=True, exist_ok=True)
        _jsonl(path / "train.jsonl", rows)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".tsv":
        path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        _jsonl(path, rows)


def test_the_documented_data_blocks_run(tmp_path, monkeypatch):
    """Every `data:` block under "Your own files" in docs/data.md reads its splits as written."""
    text = (REPO / "docs" / "data.md").read_text()
    section = text.split("## Your own files", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b)["data"] for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    for data in blocks:
        values = [v for k, v in data.items() if k.endswith("_path") or k == "dataset"]
        for files in (data.get("data_files") or {}).values():
            values += files if isinstance(files, list) else [files]
        for value in filter(None, values):
            _write_any(tmp_path / value, _two_class(12, prefix=value))
        dm = TextClassificationDataModule(**data)
        dm.setup("fit")
        dm.setup("test")
        assert dm.label_names == ["a", "b"] and len(dm.splits["test"]) >= 6


# -- 2. unused columns never make a file unreadable ----------------------------------------------------


def test_unused_columns_that_change_type_late_do_not_matter(tmp_path):
    n = 10_030
    rows = [
        {"text": f"t{i}", "label": "ab"[i % 2], "id": i if i < 10_020 else f"x-{i}", "score": 1}
        for i in range(n)
    ]
    csv_path = tmp_path / "late.csv"
    lines = ["text,label,id,score,weight"]
    for i, r in enumerate(rows):
        score = "3.5" if i == 10_025 else "1"
        weight = "" if i == 10_027 else "0.5"
        lines.append(f"{r['text']},{r['label']},{r['id']},{score},{weight}")
    csv_path.write_text("\n".join(lines) + "\n")
    # JSON Lines past pyarrow's 10 MiB read block, whose unused `id` turns from integer to string
    pad = "x" * 1500
    big = [
        {"id": i if i < 9_000 else f"id-{i}", "text": f"t{i} {pad}", "label": i % 2}
        for i in range(10_000)
    ]
    jsonl_path = _jsonl(tmp_path / "late.jsonl", big)
    assert jsonl_path.stat().st_size > 14 * 2**20
    for path, count in ((csv_path, n), (jsonl_path, 10_000)):
        ex = read_file(path)
        assert len(ex) == count and set(ex.labels) in ({"a", "b"}, {"0", "1"})
        stream = TextClassificationDataModule(
            train_path=str(path), val_path=str(csv_path), streaming=True, features="online"
        )
        assert stream.label_names == sorted(set(ex.labels))
        assert sum(len(b["index"]) for b in stream.train_dataloader()) == count


# -- 3. streaming stays flat in memory ---------------------------------------------------------------


class _PeakRSS:
    """The peak resident set size of this process while in the block, sampled every 5 ms."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        import os

        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_streaming_a_file_larger_than_the_memory_budget(tmp_path):
    """A 160 MiB (decompressed) `.jsonl.gz`: label scan, held-out rows and one training epoch in 64 MiB."""
    budget, rows, pad = 64 * 2**20, 80 * 1024, "w" * 2000
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wt", compresslevel=1, encoding="utf-8") as fh:
        for start in range(0, rows, 4096):
            fh.write(
                "".join(
                    f'{{"text": "{i} {pad}", "label": "{"abc"[i % 3]}", "id": {i}}}\n'
                    for i in range(start, start + 4096)
                )
            )
    size = gzip.GzipFile(path).seek(0, 2)  # decompressed size
    assert size > 2.4 * budget
    dm = TextClassificationDataModule(
        train_path=str(path), streaming=True, features="online", batch_size=512, val_fraction=0.005
    )
    with _PeakRSS() as rss:
        dm.setup("fit")  # the label scan, then the held-out rows
        seen = sum(len(b["index"]) for b in dm.train_dataloader())
    assert dm.label_names == ["a", "b", "c"] and seen + len(dm.splits["val"]) == rows
    assert rss.peak - rss.start < budget, f"{(rss.peak - rss.start) / 2**20:.0f} MiB"


# -- 4. one label rule for every mode ---------------------------------------------------------------


def test_streaming_and_in_memory_reads_decode_labels_alike(tmp_path):
    values = [1, "00", "01", "2", "true", "1.50", 7]
    train = _jsonl(
        tmp_path / "train.jsonl", [{"text": f"t{i}", "label": values[i % 7]} for i in range(70)]
    )
    dev = _jsonl(
        tmp_path / "dev.jsonl", [{"text": f"d{i}", "label": v} for i, v in enumerate(values)]
    )
    expected = ["00", "01", "1", "1.50", "2", "7", "true"]
    mapped = TextClassificationDataModule(train_path=str(train), val_path=str(dev))
    mapped.setup("fit")
    streamed = TextClassificationDataModule(
        train_path=str(train), val_path=str(dev), streaming=True, features="online", batch_size=70
    )
    assert mapped.label_names == streamed.label_names == expected
    batch = next(iter(streamed.train_dataloader()))
    got = {
        i: streamed.label_names[y]
        for i, y in zip(batch["index"].tolist(), batch["labels"].tolist())
    }
    assert got == {i: str(values[i % 7]) for i in range(70)}
    for bad in (True, 1.5):
        _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": bad}])
        for dm in (
            TextClassificationDataModule(train_path=str(tmp_path / "bad.jsonl")),
            TextClassificationDataModule(
                train_path=str(tmp_path / "bad.jsonl"), streaming=True, features="online"
            ),
        ):
            with pytest.raises(
                DataError, match=r"bad\.jsonl:2: field 'label' must be a string or an integer"
            ):
                _ = dm.label_names


# -- 5. one-line errors: a fake .gz, `report` on a directory without a run -----------------------------


def test_a_plain_file_named_gz_is_a_one_line_error(tmp_path, capsys):
    from layerfusion.__main__ import main

    fake = _jsonl(tmp_path / "train.jsonl.gz", _two_class(10))
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: not gzip data .*drop \.gz"):
        read_file(fake)
    stream = TextClassificationDataModule(train_path=str(fake), streaming=True, features="online")
    with pytest.raises(DataError, match=r"not gzip data"):
        _ = stream.label_names
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(fake.read_bytes())[:-30])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: the gzip data is cut off"):
        read_file(cut)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"layerfusion: error: {tmp_path}: no run.json")


def test_report_still_reads_the_committed_results():
    from layerfusion.report import collect

    rows = collect([REPO / "results" / "quickstart", REPO / "results" / "scale_sst2_glue"])
    assert [r["dataset"] for r in rows] == ["sst2", "sst2_glue"] and all(
        r["accuracy"] for r in rows
    )


# -- 6. real line numbers and causes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("blank.csv", "text,label\n\na,0\n\n\nb,\n", r"blank\.csv:6: field 'label' is empty"),
        (
            "blank.jsonl",
            '{"text": "a", "label": "0"}\n\n\n{"text": "b"}\n',
            r"blank\.jsonl:4: missing field 'label'",
        ),
        (
            "quoted.csv",
            'text,label\n"one\ntwo\nthree",0\nfour,1,extra\n',
            r"quoted\.csv:5: expected 2 fields",
        ),
        (
            "newline.tsv",
            'text\tlabel\nfine\t0\n"two\nlines"\t1\n',
            r"newline\.tsv:3: .*probably a newline inside a quoted cell: TSV is read unquoted",
        ),
        (
            "cat.csv",
            "text,label\na,0\nb,1\ntext,label\nc,0\n",
            r"cat\.csv:4: the header row \['text', 'label'\] appears again inside the data",
        ),
    ],
)
def test_errors_name_the_real_line_and_cause(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_file(path)


def test_quoted_tsv_cells_are_kept_with_a_warning(tmp_path, caplog):
    path = tmp_path / "pandas.tsv"
    path.write_text('text\tlabel\nplain\t0\n"a, quoted"\t1\n"another"\t0\n')
    with caplog.at_level(logging.WARNING, logger="layerfusion.data.readers"):
        ex = read_file(path)
    assert ex.texts == ["plain", '"a, quoted"', '"another"']
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and re.match(
        r".*pandas\.tsv:3: a cell is wrapped in quotes", warnings[0]
    )


# -- 7. a split of several files pickles (ddp_spawn, DataLoader workers) -------------------------------


def test_a_split_of_several_files_pickles(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _two_class(30, "a"))
    b = tmp_path / "b.csv"
    b.write_text("text,label\n\n" + "".join(f"b{i},{'ab'[i % 2]}\n" for i in range(30)))
    files = {"train": [str(a), str(b)], "test": [str(b), str(a)]}
    dm = TextClassificationDataModule(data_files=files)
    dm.setup("fit")
    dm.setup("test")
    copy = pickle.loads(pickle.dumps(dm))  # what ddp_spawn does with the data module
    test = copy.splits["test"]
    assert test.texts == dm.splits["test"].texts
    assert (test.where(0), test.where(29), test.where(30)) == (f"{b}:3", f"{b}:32", f"{a}:1")
    stream = TextClassificationDataModule(data_files=files, streaming=True, features="online")
    stream.setup("fit")
    loader = stream.train_dataloader()
    worker_copy = pickle.loads(
        pickle.dumps(loader.dataset)
    )  # what a spawned DataLoader worker gets
    assert sorted(r["index"] for r in worker_copy) == sorted(
        i for b in loader for i in b["index"].tolist()
    )


# -- 8. hub datasets: configuration and revision; a mistyped path is a path --------------------------


def _hub_like(root: Path) -> Path:
    """A local copy of a hub repository with two configurations (as `git clone` of nyu-mll/glue gives)."""
    configs = []
    for config in ("sst2", "cola"):
        (root / config).mkdir(parents=True)
        files = []
        for split, n in (("train", 12), ("validation", 4)):
            rows = [{"sentence": f"{config} {split} {i}", "label": i % 2} for i in range(n)]
            _jsonl(root / config / f"{split}.jsonl", rows)
            files.append({"split": split, "path": f"{config}/{split}.jsonl"})
        configs.append({"config_name": config, "data_files": files})
    (root / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n")
    return root


def test_hub_dataset_configuration_and_revision(tmp_path):
    root = _hub_like(tmp_path / "glue")
    dm = TextClassificationDataModule(
        dataset=str(root), dataset_config_name="cola", text_field="sentence"
    )
    dm.setup("fit")
    assert dm.splits["val"].texts == [f"cola validation {i}" for i in range(4)]
    assert dm.label_names == ["0", "1"]
    with pytest.raises(DataError, match=r"configuration 'nope'.*not found"):
        TextClassificationDataModule(dataset=str(root), dataset_config_name="nope").setup("fit")
    with pytest.raises(ConfigError, match=r"data\.revision selects a version of a hub dataset"):
        TextClassificationDataModule(dataset=str(root), revision="v1").setup("fit")
    # a hub id keeps its configuration and revision to the hub call (offline here: the error names them)
    hub = TextClassificationDataModule(
        dataset="nyu-mll/glue", dataset_config_name="sst2", revision="bcdcba7"
    )
    with pytest.raises(
        DataError,
        match=r"cannot load hub dataset 'nyu-mll/glue' \(configuration 'sst2', revision 'bcdcba7'\)",
    ):
        _ = hub.label_names


def test_a_mistyped_relative_path_is_a_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "reviews").mkdir(parents=True)
    for typo in ("data/reviws", "data/reviews/trian", "corpora/a/b"):
        start = time.monotonic()
        with pytest.raises(DataError, match=rf"^{typo}: no such file or directory \(data\.dataset"):
            _ = TextClassificationDataModule(dataset=typo).label_names
        assert time.monotonic() - start < 1.0  # nothing asked of the hub


# -- SST-2 and MR labels have names -----------------------------------------------------------------


def test_sst2_and_mr_labels_read_as_negative_and_positive(shared_data, tmp_path):
    for name in ("sst2", "sst2_glue", "mr"):
        dm = TextClassificationDataModule(dataset=name, data_dir=str(shared_data))
        assert dm.label_names == ["negative", "positive"], name
    dm = TextClassificationDataModule(
        dataset="sst2", data_dir=str(shared_data), max_eval_samples=10
    )
    dm.setup("test")
    raw = read_file(shared_data / "sst2" / "test.jsonl").labels
    names = {"0": "negative", "1": "positive"}
    assert dm.splits["test"].labels == [names[raw[i]] for i in dm.splits["test"].rows]
    # checkpoints trained before the names: the labels as written
    old = TextClassificationDataModule(dataset="sst2", data_dir=str(shared_data), labels=["0", "1"])
    old.setup("validate")
    assert set(old.splits["val"].labels) == {"0", "1"}
    assert read_file(shared_data / "r8" / "test.jsonl").labels[:1] == ["trade"]  # words already
