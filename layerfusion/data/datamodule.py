"""`TextClassificationDataModule`: splits, label map, per-encoder tokenization, streaming."""

from __future__ import annotations

import logging
import random
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from layerfusion.data.jsonl import DataError, Examples, read_jsonl
from layerfusion.data.sources import load_splits, sorted_labels, split_files, stratified_holdout
from layerfusion.data.stream import ShardedStream
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import ConfigError

log = logging.getLogger(__name__)


class TextClassificationDataModule(L.LightningDataModule):
    """Text classification data from a named dataset, a local `{split}.jsonl` directory or a hub id.

    Args:
        dataset: `sst2`, `sst2_glue`, `mr`, `r8`, `r52`, a directory of `{train,dev,test}.jsonl[.gz]`, or a hub id.
        data_dir: where the named datasets live (default: $LAYERFUSION_DATA, else the copies bundled with layerfusion).
        encoders: the model's encoders (linked from `model.encoders` by the CLI); one tokenizer each.
        features: `cached` batches carry row indices only; `online` batches carry tokenized inputs (linked).
        batch_size: training batch size (per device).
        eval_batch_size: batch size for validation, test and predict.
        val_fraction: share of train held out (seeded, stratified) when the source has no dev split.
        seed: seed of the held-out split, the subsets and the stream shuffle.
        max_train_samples: seeded subset of train (for quick runs); None = all.
        max_eval_samples: seeded subset of val and test (for quick runs); None = all.
        text_field: name of the text field.
        label_field: name of the label field.
        labels: the label set, when it should not be read from train (streaming over huge sources).
        streaming: stream the train split (`datasets` streaming, sharded per rank) instead of loading it.
        predict_path: a JSONL file (`text`, optional `label`) for `predict`; default: the test split.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset: str = "sst2",
        data_dir: str | None = None,
        encoders: list[EncoderSpec] | None = None,
        features: Literal["cached", "online"] = "cached",
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 42,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        text_field: str = "text",
        label_field: str = "label",
        labels: list[str] | None = None,
        streaming: bool = False,
        predict_path: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if streaming and features != "online":
            raise ConfigError(
                "data.streaming=true needs model.features=online: a stream has no row index to cache by"
            )
        self.dataset = dataset
        self.data_dir = data_dir
        self.encoders = list(encoders or [])
        self.features = features
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.text_field = text_field
        self.label_field = label_field
        self.streaming = streaming
        self.predict_path = predict_path
        self.num_workers = num_workers
        self._labels = list(labels) if labels else None
        self.splits: dict[str, Examples] = {}
        self._raw: dict[str, Examples | None] | None = None
        self._tokenizers: dict | None = None

    @property
    def label_names(self) -> list[str]:
        """Labels of the training split, sorted; index = class id."""
        if self._labels is None:
            if self.streaming:
                self._labels = sorted_labels(
                    list(self._stream_source().select_columns([self.label_field])[self.label_field])
                )
            else:
                self._labels = sorted_labels(self._load()["train"].labels)
            if len(self._labels) < 2:
                raise DataError(
                    f"dataset {self.dataset!r}: train has {len(self._labels)} distinct label(s); need at least 2"
                )
        return self._labels

    def setup(self, stage: str | None = None) -> None:
        """Build the splits a stage needs: fit -> train, val; validate -> val; test -> test; predict."""
        want = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["predict"],
        }
        for split in want.get(stage or "fit", ["train", "val", "test"]):
            if split not in self.splits and not (split == "train" and self.streaming):
                self.splits[split] = self._split(split)

    def texts(self, split: str) -> list[str]:
        """The texts of a set-up split, in row order."""
        return self.splits[split].texts

    def label_ids(self, split: str) -> list[int]:
        """Class ids of a set-up split (-1 where a predict row has no label)."""
        index = {lab: i for i, lab in enumerate(self.label_names)}
        return [index[lab] if lab is not None else -1 for lab in self.splits[split].labels]

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            stream = ShardedStream(
                self._stream_source(),
                self.label_names,
                self.text_field,
                self.label_field,
                self.seed,
                self.max_train_samples,
            )
            return self._loader(stream, self.batch_size, shuffle=False)
        return self._loader(self._dataset("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("predict"), self.eval_batch_size)

    def tokenizers(self) -> dict:
        """One tokenizer (with its max length) per encoder, keyed by encoder key."""
        if self._tokenizers is None:
            from layerfusion.encoders.frozen import clamp_max_length, load_config, load_tokenizer

            self._tokenizers = {}
            for spec in self.encoders:
                tok = load_tokenizer(spec)
                self._tokenizers[spec.key] = (tok, clamp_max_length(spec, tok, load_config(spec)))
        return self._tokenizers

    # -- helpers ---------------------------------------------------------------------------------

    def _load(self) -> dict[str, Examples | None]:
        if self._raw is None:
            self._raw = load_splits(self.dataset, self.data_dir, self.text_field, self.label_field)
        return self._raw

    def _split(self, split: str) -> Examples:
        """One split after hold-out, subsetting and the unseen-label check."""
        if split == "predict":
            if self.predict_path:
                return read_jsonl(
                    self.predict_path, self.text_field, self.label_field, require_labels=False
                )
            split = "test"
        raw = self._load()
        if split == "test":
            if raw["test"] is None:
                raise DataError(f"dataset {self.dataset!r} has no test split")
            return self._check_labels(_subset(raw["test"], self.max_eval_samples, self.seed))
        if raw["val"] is not None:
            train, val = raw["train"], raw["val"]
        else:
            keep, held = stratified_holdout(raw["train"].labels, self.val_fraction, self.seed)
            train, val = _take(raw["train"], keep), _take(raw["train"], held)
        if split == "train":
            return _subset(train, self.max_train_samples, self.seed)
        return self._check_labels(_subset(val, self.max_eval_samples, self.seed))

    def _check_labels(self, ex: Examples) -> Examples:
        known = set(self.label_names)
        for i, lab in enumerate(ex.labels):
            if lab is not None and lab not in known:
                where = f"{ex.source}:{ex.lines[i]}" if ex.lines else f"{ex.source}, row {i}"
                raise DataError(
                    f"{where}: label {lab!r} does not occur in train; known labels: {self.label_names}"
                )
        return ex

    def _dataset(self, split: str) -> Dataset:
        if split not in self.splits:
            self.setup({"train": "fit", "val": "validate"}.get(split, split))
        return RowDataset(self.splits[split].texts, self.label_ids(split))

    def _loader(self, dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        collate = Collator(self.tokenizers() if self.features == "online" else None)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def _stream_source(self):
        import datasets

        files = split_files(self.dataset, self.data_dir)
        if files is None:
            return datasets.load_dataset(self.dataset, split="train", streaming=True)
        return datasets.load_dataset(
            "json", data_files=str(files["train"]), split="train", streaming=True
        )


class RowDataset(Dataset):
    """Rows of one split: index, text, class id."""

    def __init__(self, texts: list[str], labels: list[int]) -> None:
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "text": self.texts[i], "label": self.labels[i]}


class Collator:
    """Batch rows; with tokenizers, add `inputs[encoder] = {input_ids, attention_mask}` padded per batch."""

    def __init__(self, tokenizers: dict | None) -> None:
        self.tokenizers = tokenizers

    def __call__(self, rows: list[dict]) -> dict:
        batch = {
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
            "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
        }
        if self.tokenizers:
            texts = [r["text"] for r in rows]
            batch["inputs"] = {}
            for key, (tok, max_len) in self.tokenizers.items():
                enc = tok(
                    texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt"
                )
                # single texts: no token_type_ids (GPT-2 would embed them with its token table)
                batch["inputs"][key] = {
                    "input_ids": enc["input_ids"],
                    "attention_mask": enc["attention_mask"],
                }
        return batch


def _take(ex: Examples, rows: list[int]) -> Examples:
    lines = [ex.lines[i] for i in rows] if ex.lines else None
    return Examples([ex.texts[i] for i in rows], [ex.labels[i] for i in rows], ex.source, lines)


def _subset(ex: Examples, n: int | None, seed: int) -> Examples:
    """A seeded subset of `n` rows (in their original order), or everything."""
    if n is None or n >= len(ex):
        return ex
    return _take(ex, sorted(random.Random(seed).sample(range(len(ex)), n)))
