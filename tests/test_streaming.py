"""Streaming: no validation row in the training stream, lazy reads, labels, DataLoader workers, epochs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import gloo_ranks

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.data.readers import DataError, read_jsonl
from layerfusion.data.sources import SplitSource

pytestmark = pytest.mark.usefixtures("one_thread")


def _stream_dm(**kw) -> TextClassificationDataModule:
    return TextClassificationDataModule(streaming=True, features="online", batch_size=64, **kw)


def _epoch(loader) -> list[int]:
    """The file rows one pass of the training loader yields."""
    return [i for batch in loader for i in batch["index"].tolist()]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_stream_and_validation_partition_train_exactly_once_per_epoch(shared_data):
    """MR has no dev file: validation is held out of train, and the stream never yields those rows."""
    dm = _stream_dm(dataset="mr", data_dir=str(shared_data))
    dm.setup("fit")
    val_rows = dm.splits["val"].rows
    train = read_jsonl(shared_data / "mr" / "train.jsonl")
    assert dm.splits["val"].texts == [train.texts[i] for i in val_rows]
    loader = dm.train_dataloader()
    epochs = [_epoch(loader), _epoch(loader)]
    for rows in epochs:
        assert len(rows) == len(set(rows))  # each row once
        assert not set(rows) & set(val_rows)  # no validation row trained on
        assert sorted(rows + val_rows) == list(range(len(train))) == list(range(7108))
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    # the same rows as the map-style mode (one held-out rule for both)
    mapped = TextClassificationDataModule(dataset="mr", data_dir=str(shared_data))
    mapped.setup("fit")
    assert mapped.splits["val"].rows == val_rows
    assert sorted(mapped.splits["train"].rows) == sorted(epochs[0])


def test_validation_and_test_are_read_without_the_train_file(tmp_path):
    """With a dev file and data.labels, a train file that cannot be parsed is not touched until training."""
    _write(tmp_path / "train.jsonl", ['{"text": "a", "label": "0"}', '{"text": broken'])
    _write(tmp_path / "dev.jsonl", [{"text": f"d{i}", "label": str(i % 2)} for i in range(6)])
    _write(tmp_path / "test.jsonl", [{"text": f"t{i}", "label": str(i % 2)} for i in range(4)])
    dm = _stream_dm(dataset=str(tmp_path), labels=["0", "1"])
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.splits["val"]) == 6 and len(dm.splits["test"]) == 4
    with pytest.raises(DataError, match=r"train\.jsonl"):
        _epoch(dm.train_dataloader())


def test_label_map_from_a_scan_of_integer_labels(tmp_path):
    """Integer JSON labels stream (they crashed the label scan) and map to the same ids as map-style."""
    _write(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 3 * 5} for i in range(60)])
    dm = _stream_dm(dataset=str(tmp_path))
    assert dm.label_names == ["0", "5", "10"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert all(i % 3 == y for i, y in zip(batch["index"].tolist(), batch["labels"].tolist()))


def test_train_label_outside_given_labels_stops_the_stream(tmp_path):
    _write(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": str(i % 3)} for i in range(30)])
    _write(tmp_path / "dev.jsonl", [{"text": "d", "label": "0"}, {"text": "e", "label": "1"}])
    dm = _stream_dm(dataset=str(tmp_path), labels=["0", "1"])
    dm.setup("fit")
    with pytest.raises(
        DataError, match=r"train\.jsonl:3: label '2' is not among the labels \['0', '1'\]"
    ):
        _epoch(dm.train_dataloader())


def test_class_label_ids_stream_as_the_names_validation_uses(tmp_path):
    """ClassLabel ids in the train stream match the validation split's label names (hub and saved datasets)."""
    import datasets

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["neg", "pos", "neutral"]),
        }
    )
    make = lambda n, off: datasets.Dataset.from_dict(  # noqa: E731
        {"text": [f"r{off + i}" for i in range(n)], "label": [(off + i) % 3 for i in range(n)]},
        features=features,
    )
    dd = datasets.DatasetDict({"train": make(30, 0), "validation": make(9, 100)})
    dd.save_to_disk(tmp_path / "saved")
    # the same splits in the layout of a hub repository (Parquet files with the features in their metadata)
    for key, ds in dd.items():
        ds.to_parquet(tmp_path / "hub" / "data" / f"{key}-00000-of-00001.parquet")
    dm = _stream_dm(dataset=str(tmp_path / "saved"))
    dm.setup("fit")
    assert dm.label_names == ["neg", "neutral", "pos"]
    names = ["neg", "pos", "neutral"]
    assert dm.splits["val"].labels == [names[(100 + i) % 3] for i in range(9)]
    batch = next(iter(dm.train_dataloader()))
    for i, y in zip(batch["index"].tolist(), batch["labels"].tolist()):
        assert dm.label_names[y] == names[i % 3]
    hub = {
        key: SplitSource("hub", str(tmp_path / "hub"), key=key) for key in ("train", "validation")
    }
    assert hub["train"].class_names("label") == names
    val = hub["validation"].read("text", "label")  # streamed: no other split downloaded
    assert val.labels == dm.splits["val"].labels and val.texts == dm.splits["val"].texts


def test_two_dataloader_workers_each_train_on_half(tmp_path):
    """`datasets` would give a one-file stream to worker 0 only; each worker must yield its own half."""
    _write(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": str(i % 2)} for i in range(101)])
    _write(tmp_path / "dev.jsonl", [{"text": "d", "label": "0"}, {"text": "e", "label": "1"}])
    dm = _stream_dm(dataset=str(tmp_path), num_workers=2)
    dm.batch_size = 10
    dm.setup("fit")
    loader = dm.train_dataloader()
    rows = _epoch(loader)
    assert len(rows) == len(set(rows)) == 100  # 101 rows over 2 workers: one dropped, none repeated
    again = _epoch(loader)
    assert len(again) == len(set(again)) == 100 and again != rows  # a new epoch order
    one = _stream_dm(dataset=str(tmp_path))
    one.setup("fit")
    assert len(_epoch(one.train_dataloader())) == 101


def test_sample_limit_is_a_fixed_stratified_subset_reshuffled_per_epoch(tmp_path):
    rows = [{"text": f"t{i}", "label": "rare" if i % 25 == 0 else "common"} for i in range(500)]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "dev.jsonl", rows[:10])
    dm = _stream_dm(dataset=str(tmp_path), max_train_samples=50)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = _epoch(loader), _epoch(loader)
    assert sorted(first) == sorted(second) and first != second  # same subset, new order
    assert Counter(rows[i]["label"] for i in first) == {"common": 48, "rare": 2}


def test_lightning_epochs_reshuffle_the_stream(tmp_path):
    """Lightning calls set_epoch on samplers only: a real `Trainer.fit` must still see a new order each epoch."""
    import lightning as L

    _write(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": str(i % 2)} for i in range(40)])
    _write(tmp_path / "dev.jsonl", [{"text": "d", "label": "0"}, {"text": "e", "label": "1"}])

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.rows: dict[int, list[int]] = {}

        def training_step(self, batch, batch_idx):
            self.rows.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
            return (self.w - batch["labels"].float().mean()) ** 2

        def validation_step(self, batch, batch_idx):  # never run (limit_val_batches=0)
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=_stream_dm(dataset=str(tmp_path)))
    orders = [model.rows[e] for e in range(3)]
    assert all(sorted(o) == list(range(40)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3  # three epochs, three orders


RANK_SCRIPT = """
import json, sys, torch.distributed as dist
from layerfusion.data.datamodule import TextClassificationDataModule

dist.init_process_group("gloo")
dm = TextClassificationDataModule(
    dataset=sys.argv[1], streaming=True, features="online", batch_size=8, num_workers=2
)
dm.setup("fit")
loader = dm.train_dataloader()
epochs = [[i for b in loader for i in b["index"].tolist()] for _ in range(2)]
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"epochs": epochs, "val": dm.splits["val"].rows})
if dist.get_rank() == 0:
    print(json.dumps(gathered))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_with_two_workers_each_share_the_stream(tmp_path):
    """A real 2-process Gloo group, 2 DataLoader workers per rank: 4 slots, equal counts, no repeats, no
    validation row, every train row but the `rows % 4` dropped at the end of each epoch's order."""
    _write(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": str(i % 3)} for i in range(223)])
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    ranks = json.loads(gloo_ranks(script, str(tmp_path))[0])
    val = ranks[0]["val"]
    # 10 % of each class (75, 74, 74 rows) held out, the same rows on both ranks: 8 + 7 + 7
    assert ranks[1]["val"] == val and len(val) == 22
    for epoch in range(2):
        rows = [ranks[r]["epochs"][epoch] for r in range(2)]
        assert len(rows[0]) == len(rows[1]) == 100  # 201 training rows over 4 slots: 50 per worker
        together = rows[0] + rows[1]
        assert len(set(together)) == 200 and not set(together) & set(val)
        assert set(together) <= set(range(223))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]
