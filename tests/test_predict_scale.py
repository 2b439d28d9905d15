"""`PredictionWriter` streams: rows reach the output as batches complete, in row order, in the format of
the writer that gathered everything at the end; a failed run leaves no partial file; under 2-process
`ddp_spawn` rank 0 merges the ranks' parts in row order, every row once."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from layerfusion.callbacks import PredictionWriter

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.module import LayerFusionModule


def _build(tiny_models, data_dir: Path, cache: Path, predict_path: Path | None = None):
    specs = [EncoderSpec(tiny_models["bert"], max_length=32, alias="bert")]
    dm = TextClassificationDataModule(
        dataset=str(data_dir),
        encoders=specs,
        eval_batch_size=16,
        predict_path=str(predict_path) if predict_path else None,
    )
    torch.manual_seed(0)  # the untrained head: every run of a test predicts with the same weights
    model = LayerFusionModule(
        specs, label_names=dm.label_names, cache_dir=str(cache), cache_dtype="float32", hidden=16
    )
    return dm, model


def _trainer(callbacks, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    return L.Trainer(**{**args, **kw})


def _old_writer_lines(dm, names: list[str], outputs: list[dict]) -> list[str]:
    """The rows the gather-at-epoch-end writer wrote (its code, on `trainer.predict`'s returned outputs)."""
    index = torch.cat([p["index"] for p in outputs]).cpu()
    probs = torch.cat([p["probs"] for p in outputs]).cpu()
    texts, gold = dm.texts("predict"), dm.splits["predict"].labels
    lines = []
    for i, p in sorted(zip(index.tolist(), probs.tolist())):
        row = {
            "text": texts[i],
            "label": names[max(range(len(p)), key=p.__getitem__)],
            "probs": dict(zip(names, p)),
        }
        if gold[i] is not None:
            row["gold"] = gold[i]
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return lines


class WatchOutput(L.Callback):
    """After each predicted batch (and the writer's own hook, which runs first): the rows written so far
    to the writer's temporary file, and whether the final file exists yet."""

    def __init__(self, writer: PredictionWriter, fail_at: int | None = None) -> None:
        self.writer, self.fail_at, self.seen = writer, fail_at, []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *rest) -> None:
        written = Path(self.writer._out.name).read_text(encoding="utf-8").count("\n")
        self.seen.append((written, self.writer.path.exists()))
        if batch_idx == self.fail_at:
            raise RuntimeError("stopped on purpose")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_rows_stream_in_order_in_the_old_format_and_a_failure_leaves_no_partial_file(
    tmp_path, tiny_models, sst2_slice
):
    dm, model = _build(tiny_models, sst2_slice, tmp_path / "cache")
    reference = _old_writer_lines(dm, model.label_names, _trainer([]).predict(model, dm))
    assert len(reference) == 80 and all('"gold": ' in line for line in reference)

    out = tmp_path / "run" / "predictions.jsonl"
    writer = PredictionWriter(str(out))
    watch = WatchOutput(writer)
    assert _trainer([writer, watch]).predict(model, dm, return_predictions=False) is None
    # 80 rows in batches of 16: each batch is on disk when it completes; the final file appears at the end
    assert watch.seen == [(16, False), (32, False), (48, False), (64, False), (80, False)]
    assert out.read_text(encoding="utf-8").splitlines(keepends=True) == reference
    assert _leftovers(out.parent) == []

    # rows without a label have no `gold`; a run that fails midway leaves the previous file whole
    unlabeled = tmp_path / "unlabeled.jsonl"
    texts = dm.texts("predict")[:40]
    unlabeled.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    dm2, model2 = _build(tiny_models, sst2_slice, tmp_path / "cache", unlabeled)
    failing = PredictionWriter(str(out))
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        _trainer([failing, WatchOutput(failing, fail_at=1)]).predict(
            model2, dm2, return_predictions=False
        )
    assert out.read_text(encoding="utf-8").splitlines(keepends=True) == reference
    assert _leftovers(out.parent) == []
    _trainer([PredictionWriter(str(out))]).predict(model2, dm2, return_predictions=False)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts and not any("gold" in r for r in rows)
    for row, line in zip(rows, reference[:40], strict=True):  # features of other batches: fp noise
        assert row["probs"] == pytest.approx(json.loads(line)["probs"], abs=1e-6)


class ShuffledPredict(TextClassificationDataModule):
    """Predicts its rows in a shuffled order (a loader the writer cannot stream in row order)."""

    def predict_dataloader(self):
        loader = super().predict_dataloader()
        return torch.utils.data.DataLoader(
            loader.dataset,
            batch_size=16,
            sampler=torch.randperm(
                len(loader.dataset), generator=torch.Generator().manual_seed(0)
            ).tolist(),
            collate_fn=loader.collate_fn,
        )


def test_rows_out_of_order_stop_the_run_without_an_output(tmp_path, tiny_models, sst2_slice):
    _, model = _build(tiny_models, sst2_slice, tmp_path / "cache")
    specs = [EncoderSpec(tiny_models["bert"], max_length=32, alias="bert")]
    dm = ShuffledPredict(dataset=str(sst2_slice), encoders=specs)
    out = tmp_path / "run" / "predictions.jsonl"
    with pytest.raises(RuntimeError, match=r"rank 0 predicted row \d+ after row \d+.*shuffled"):
        _trainer([PredictionWriter(str(out))]).predict(model, dm, return_predictions=False)
    assert not out.exists() and _leftovers(out.parent) == []


def test_merge_refuses_a_row_two_ranks_predicted(tmp_path):
    writer = PredictionWriter(str(tmp_path / "predictions.jsonl"))
    writer._parts = tmp_path / ".parts"
    writer._parts.mkdir()
    (writer._parts / "rank0.jsonl").write_text('0\t{"r": 0}\n2\t{"r": 2}\n4\t{"r": 4}\n')
    (writer._parts / "rank1.jsonl").write_text('1\t{"r": 1}\n3\t{"r": 3}\n')
    assert writer._merge(2) is None
    assert (tmp_path / "predictions.jsonl").read_text() == "".join(
        f'{{"r": {i}}}\n' for i in range(5)
    )
    (writer._parts / "rank1.jsonl").write_text('1\t{"r": 1}\n2\t{"r": 2}\n')
    (tmp_path / "predictions.jsonl").unlink()
    assert "row 2 was predicted by two ranks" in writer._merge(2)
    assert not (tmp_path / "predictions.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".parts"]  # no temporary file left
    (writer._parts / "rank1.jsonl").unlink()
    assert "must be on a filesystem every rank sees" in writer._merge(2)


@pytest.mark.slow
def test_ddp_spawn_ranks_write_parts_that_rank_0_merges_in_row_order(
    tmp_path, tiny_models, sst2_slice
):
    # 77 rows: the ranks get 39 and 38, in batches of 16 that end at different rows
    rows = tmp_path / "rows.jsonl"
    lines = (sst2_slice / "train.jsonl").read_text(encoding="utf-8").splitlines()[:77]
    rows.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = {n: tmp_path / f"run{n}" / "predictions.jsonl" for n in (1, 2)}
    for devices in (2, 1):
        dm, model = _build(tiny_models, sst2_slice, tmp_path / "cache", rows)
        strategy = "ddp_spawn" if devices == 2 else "auto"
        trainer = _trainer(
            [PredictionWriter(str(out[devices]))], devices=devices, strategy=strategy
        )
        trainer.predict(model, dm, return_predictions=False)
    ddp, one = (
        [json.loads(line) for line in out[n].read_text(encoding="utf-8").splitlines()]
        for n in (2, 1)
    )
    texts = [json.loads(line)["text"] for line in lines]
    assert [r["text"] for r in ddp] == [r["text"] for r in one] == texts  # every row once, in order
    assert [(r["label"], r["gold"]) for r in ddp] == [(r["label"], r["gold"]) for r in one]
    for a, b in zip(ddp, one, strict=True):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-6)
    assert _leftovers(out[2].parent) == []
