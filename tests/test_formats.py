"""Every local data format: read through `datasets`' builders, bad rows named, and a CLI `fit` on each."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from layerfusion.cli import cli_main
from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.data.readers import DataError, read_file, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"train": 48, "dev": 16, "test": 16}
FORMATS = ["jsonl", "jsonl.gz", "json", "csv", "tsv", "csv.gz", "parquet", "disk", "disk_dict"]


@pytest.fixture(scope="module")
def rows(shared_data) -> dict[str, list[dict]]:
    """Slices of real SST-2 with the labels as written ("0" / "1")."""
    out = {}
    for split, n in SIZES.items():
        ex = read_jsonl(shared_data / "sst2" / f"{split}.jsonl")
        # balanced, so a 1-epoch fit always sees both classes
        pick = [i for i in range(len(ex)) if ex.labels[i] == "0"][: n // 2]
        pick += [i for i in range(len(ex)) if ex.labels[i] == "1"][: n // 2]
        out[split] = [{"text": ex.texts[i], "label": ex.labels[i]} for i in sorted(pick)]
    return out


def write(fmt: str, path: Path, rows: list[dict], bom: bool = False) -> Path:
    """Write `rows` as `fmt` the way other tools do (pandas, datasets, json) and return the file."""
    import datasets
    import pandas as pd

    df = pd.DataFrame(rows)
    if fmt == "parquet":
        df.to_parquet(path.with_suffix(".parquet"), index=False)
        return path.with_suffix(".parquet")
    if fmt in ("disk", "disk_dict"):
        ds = datasets.Dataset.from_pandas(df, preserve_index=False)
        ds.save_to_disk(path)
        return path
    name = path.with_name(f"{path.name}.{fmt}")
    if fmt.startswith("jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif fmt == "json":
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    else:
        text = df.to_csv(index=False)
        if fmt == "tsv":  # plain TSV as GLUE writes it: no quoting
            text = "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows)
    data = ("\ufeff" if bom else "").encode() + text.encode("utf-8")
    name.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    return name


def _split_args(fmt: str, d: Path, rows: dict) -> dict[str, str]:
    """data.* keys that give train / val / test in `fmt`."""
    if fmt == "disk_dict":
        import datasets
        import pandas as pd

        dd = datasets.DatasetDict(
            {
                key: datasets.Dataset.from_pandas(pd.DataFrame(rows[split]), preserve_index=False)
                for key, split in (("train", "train"), ("validation", "dev"), ("test", "test"))
            }
        )
        dd.save_to_disk(d / "saved")
        return {"dataset": str(d / "saved")}
    paths = {split: write(fmt, d / split, rows[split], bom=True) for split in SIZES}
    return {
        "train_path": str(paths["train"]),
        "val_path": str(paths["dev"]),
        "test_path": str(paths["test"]),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_the_same_rows(tmp_path, rows, fmt):
    dm = TextClassificationDataModule(**_split_args(fmt, tmp_path, rows))
    dm.setup("fit")
    dm.setup("test")
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        assert dm.splits[split].texts == [r["text"] for r in rows[name]], split
        assert dm.splits[split].labels == [r["label"] for r in rows[name]], split
    assert dm.label_names == ["0", "1"]


def test_a_directory_of_csv_files(tmp_path, rows):
    for split in SIZES:
        write("csv", tmp_path / split, rows[split])
    dm = TextClassificationDataModule(dataset=str(tmp_path))
    dm.setup("fit")
    assert dm.splits["val"].texts == [r["text"] for r in rows["dev"]]
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"2 files for one split \(train\.jsonl, train\.csv\)"):
        TextClassificationDataModule(dataset=str(tmp_path)).setup("fit")


def test_data_files_mapping_with_several_files_per_split(tmp_path, rows):
    a = write("csv", tmp_path / "a", rows["train"][:20])
    b = write("jsonl", tmp_path / "b", rows["train"][20:])
    dm = TextClassificationDataModule(data_files={"train": [str(a), str(b)], "test": str(b)})
    dm.setup("fit")
    assert sorted(dm.splits["train"].texts + dm.splits["val"].texts) == sorted(
        r["text"] for r in rows["train"]
    )
    bad = write("jsonl", tmp_path / "c", [*rows["test"][:3], {"text": "x", "label": None}])
    dm = TextClassificationDataModule(
        data_files={"train": [str(a), str(b)], "test": [str(b), str(bad)]}
    )
    with pytest.raises(DataError, match=r"c\.jsonl:4: field 'label' is null"):
        dm.setup("test")


def test_csv_keeps_cells_as_written(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('text,label\n"two\nlines",01\nNA,1\nnull,01\n', encoding="utf-8")
    ex = read_file(path)
    assert ex.texts == ["two\nlines", "NA", "null"] and ex.labels == ["01", "1", "01"]


BROKEN = {
    # format: (file content, expected message)
    "jsonl": (
        b'{"text": "a", "label": "0"}\n{"text": "b" "label": "1"}\n',
        r"x\.jsonl:2: malformed JSON",
    ),
    "json": (
        b'[{"text": "a", "label": "0"},\n {"text": "b", "label": }]',
        r"x\.json:2: malformed JSON",
    ),
    "csv": (b'text,label\n"a\nb",0\nc,1,extra\n', r"x\.csv:4: expected 2 fields as in the header"),
    "tsv": (b"text\tlabel\na\t0\nb\t1\tc\n", r"x\.tsv:3: expected 2 fields as in the header"),
    "csv.gz": (gzip.compress(b"text,label\na,0\nb,\n"), r"x\.csv\.gz:3: field 'label' is empty"),
    "jsonl.gz": (
        gzip.compress(b'{"text": "a", "label": "0"}\n{"text": "\xe9", "label": "1"}\n'),
        r"x\.jsonl\.gz:2: not valid UTF-8",
    ),
    "parquet": (b"PAR1 not really", r"x\.parquet: cannot read as Parquet"),
}


@pytest.mark.parametrize("fmt", sorted(BROKEN))
def test_a_broken_file_names_the_file_and_line(tmp_path, fmt):
    content, message = BROKEN[fmt]
    path = tmp_path / f"x.{fmt}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_file(path)


def test_a_broken_parquet_row_names_column_and_row(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": ["a", "b", None], "label": [0, 1, 1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet, row 3: field 'text' is null"):
        read_file(tmp_path / "x.parquet")
    pd.DataFrame({"text": ["a", "b"], "label": [0.5, 1.0]}).to_parquet(tmp_path / "y.parquet")
    with pytest.raises(
        DataError, match=r"y\.parquet, row 1: field 'label' must be a string or an integer"
    ):
        read_file(tmp_path / "y.parquet")


def test_a_broken_saved_dataset_names_split_and_row(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "", "c"], "label": ["0", "1", "0"]})
    ds.save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"saved, row 2: field 'text' is empty"):
        TextClassificationDataModule(dataset=str(tmp_path / "saved")).setup("fit")


def test_class_label_names_and_hidden_test_labels(tmp_path):
    """ClassLabel ids read as their names; a test split whose labels are hidden (-1, as in GLUE) is refused."""
    import datasets

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
        }
    )
    train = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]},
        features=features,
    )
    test = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [-1, -1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "glue_like")
    dm = TextClassificationDataModule(dataset=str(tmp_path / "glue_like"))
    dm.setup("fit")
    assert dm.label_names == ["negative", "positive"]
    assert set(dm.splits["val"].labels) == {"negative", "positive"}
    with pytest.raises(DataError, match=r"no gold labels .*hidden, -1.*use `predict`"):
        dm.setup("test")
    dm.setup("predict")  # unlabelled rows are fine to predict
    assert dm.label_ids("predict") == [-1, -1]


def test_text_and_label_fields_name_the_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("sentence,sentiment,id\nhello,pos,1\nbye,neg,2\n", encoding="utf-8")
    ex = read_file(path, text_field="sentence", label_field="sentiment")
    assert ex.texts == ["hello", "bye"] and ex.labels == ["pos", "neg"]
    with pytest.raises(
        DataError, match=r"x\.csv: no field 'text' \(fields: \['sentence', 'sentiment', 'id'\]\)"
    ):
        read_file(path)


# -- end to end through the CLI ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_dir) -> str:
    """A 2-layer random BERT with MiniLM's real tokenizer."""
    import shutil

    from transformers import AutoModel

    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = json.loads((Path(minilm_dir) / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("bert", vocab)).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (Path(minilm_dir) / f).exists():
            shutil.copy(Path(minilm_dir) / f, path / f)
    return str(path)


# plain JSON Lines, csv.gz and a single saved Dataset read through the same builders as jsonl.gz, csv and
# a saved DatasetDict (test_each_format_reads_the_same_rows): one CLI run per builder path keeps this short
@pytest.mark.parametrize("fmt", ["jsonl.gz", "json", "csv", "tsv", "parquet", "disk_dict"])
def test_fit_through_the_cli_on_each_format(tmp_path, monkeypatch, rows, tiny_bert, fmt):
    monkeypatch.setattr(sys, "argv", ["layerfusion"])  # the CLI reads args=, not pytest's argv
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {
            "encoders": [{"name": tiny_bert, "max_length": 32}],
            "head": "mean_layers",
            "cache_dir": str(tmp_path / "cache"),
        },
        "data": {**_split_args(fmt, tmp_path, rows), "batch_size": 16},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(args=["fit", "--config", str(tmp_path / "config.yaml")])
    assert cli.trainer.state.finished and cli.trainer.global_step == 3  # 48 rows / 16
    assert "val_acc" in cli.trainer.callback_metrics
    assert cli.model.label_names == ["0", "1"]
    assert cli.datamodule.splits["train"].texts == [r["text"] for r in rows["train"]]
    assert "test" not in cli.datamodule.splits  # fit never reads the test split
