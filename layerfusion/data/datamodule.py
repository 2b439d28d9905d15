"""`TextClassificationDataModule`: splits, label map, per-encoder tokenization, streaming."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from layerfusion.data.readers import DataError, Examples
from layerfusion.data.sources import (
    STAGE_SPLITS,
    SplitSource,
    path_source,
    resolve_splits,
    sorted_labels,
    stratified_holdout,
    stratified_subset,
)
from layerfusion.data.stream import ShardedStream, StreamLoader, read_rows, scan_labels
from layerfusion.encoders.forward import tokenize
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import ConfigError

log = logging.getLogger(__name__)


class TextClassificationDataModule(L.LightningDataModule):
    """Text classification data from a named dataset, local files (JSON Lines, JSON, CSV, TSV, Parquet,
    `save_to_disk`) or a hub id.

    Args:
        dataset: `sst2` (the default when no train file is given), `sst2_glue`, `mr`, `r8`, `r52` (a named
            dataset comes whole: not mixed with split files of your own); a directory
            of `{train,dev|validation|val,test}.{jsonl,json,csv,tsv,parquet}` (text formats also `.gz`) or
            written by `save_to_disk`; a single data file (train only); or a hub id.
        train_path: the train split's file (or `save_to_disk` directory); replaces the train split of a
            directory or hub `dataset`.
        val_path: the validation split's file; without one, validation is held out of train.
        test_path: the test split's file.
        data_files: `{split: file or [files]}` like `datasets`' `data_files` (train, validation|dev|val, test).
        data_dir: where the named datasets live (default: $LAYERFUSION_DATA, else the copies bundled with layerfusion).
        dataset_config_name: a hub dataset's configuration (`datasets.load_dataset(dataset, name)`), e.g. `sst2`
            of `nyu-mll/glue`.
        revision: a hub dataset's revision (branch, tag or commit): pin it so the data cannot change under you.
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
        labels: the label set in class-id order, when it should not be read from train (streaming over huge
            sources); a train label outside it is an error.
        streaming: stream the train split (`datasets` streaming, sharded per rank) instead of loading it.
            Validation and test are read without the train file when they have their own files; the train
            label column is scanned once when `labels` is unset, validation is held out of train, or
            `max_train_samples` is set.
        predict_path: a data file (`text`, optional `label`) for `predict`; default: the test split.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset: str | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        data_files: dict[str, str | list[str]] | None = None,
        data_dir: str | None = None,
        dataset_config_name: str | None = None,
        revision: str | None = None,
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
        for key, value in (
            ("max_train_samples", max_train_samples),
            ("max_eval_samples", max_eval_samples),
        ):
            if value is not None and value < 1:
                raise ConfigError(
                    f"data.{key} must be a positive number of rows (or null for all), got {value}"
                )
        if labels is not None and len(set(labels)) != len(labels):
            raise ConfigError(f"data.labels has repeated labels: {labels}")
        self.dataset = dataset
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.data_files = data_files
        self.data_dir = data_dir
        self.dataset_config_name, self.revision = dataset_config_name, revision
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
        self._given_labels = labels is not None
        self._labels = list(labels) if labels else None
        self.splits: dict[str, Examples] = {}
        self._sources: dict[str, SplitSource | None] | None = None
        self._train: Examples | None = None  # all train rows (map-style)
        self._train_label_column: list[str | None] | None = None
        self._tokenizers: dict | None = None

    @property
    def label_names(self) -> list[str]:
        """The label set: `labels` as given, else the train labels (or ClassLabel names) sorted; index = class id."""
        if self._labels is None:
            names = self._source("train").class_names(self.label_field)
            self._labels = sorted_labels(names or self._train_labels())
        if len(self._labels) < 2:
            raise DataError(
                f"{self._source('train').location}: {len(self._labels)} distinct label(s) {self._labels}; "
                "need at least 2"
            )
        return self._labels

    def setup(self, stage: str | None = None) -> None:
        """Build the splits a stage needs: fit -> train, val; validate -> val; test -> test; predict."""
        for split in STAGE_SPLITS.get(stage or "fit", ["train", "val", "test"]):
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
            return self._stream_loader()
        return self._loader(self._dataset("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")

    def _eval_loader(self, split: str) -> DataLoader:
        """Every row of `split` exactly once across ranks: under DDP each rank reads rows `rank::world`,
        unpadded (Lightning's own `DistributedSampler` would repeat rows to even out the ranks; metrics
        are summed over ranks, so uneven counts are exact)."""
        dataset = self._dataset(split)
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        sampler = None
        if kwargs and kwargs.get("num_replicas", 1) > 1:
            sampler = UnpaddedSampler(dataset, kwargs["num_replicas"], kwargs["rank"])
        return self._loader(dataset, self.eval_batch_size, sampler=sampler)

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

    def _source(self, split: str) -> SplitSource | None:
        if self._sources is None:
            self._sources = resolve_splits(
                self.dataset,
                self.data_dir,
                self.train_path,
                self.val_path,
                self.test_path,
                self.data_files,
                self.dataset_config_name,
                self.revision,
            )
            if self._given_labels:
                self._sources = _as_written(self._sources, self._labels)
        return self._sources[split]

    def _split(self, split: str) -> Examples:
        """One split after hold-out, subsetting and the label check; reads only that split's source."""
        tf, lf = self.text_field, self.label_field
        require_labels = split != "predict"
        if split == "predict":
            if self.predict_path:
                ex = path_source(self.predict_path, "data.predict_path").read(
                    tf, lf, require_labels=False
                )
                return self._check_labels(ex)
            split = "test"
        if split == "train":
            keep, _ = self._train_rows()
            return self._check_labels(self._train_examples().take(keep))
        source = self._source(split)
        if source is not None:
            ex = source.read(tf, lf, require_labels)
        elif split == "val":
            _, held = self._train_rows()
            ex = (
                self._train_examples().take(held) if not self.streaming else self._stream_rows(held)
            )
        else:
            raise DataError(
                f"{self._source('train').location}: no test split; set data.test_path (or data.data_files.test)"
            )
        return self._check_labels(
            ex.take(stratified_subset(ex.labels, self.max_eval_samples, self.seed))
        )

    def _train_examples(self) -> Examples:
        if self._train is None:
            self._train = self._source("train").read(self.text_field, self.label_field)
        return self._train

    def _train_labels(self) -> list[str | None]:
        """The train label column: from the loaded train split, or one scan of the stream."""
        if self._train_label_column is None:
            if self.streaming:
                self._train_label_column = scan_labels(
                    self._source("train"), self.text_field, self.label_field
                )
            else:
                self._train_label_column = self._train_examples().labels
        return self._train_label_column

    def _train_rows(self) -> tuple[list[int], list[int]]:
        """(training rows, held-out validation rows) of the train source; both modes use the same rule."""
        labels = self._train_labels()
        if self._source("val") is None:
            keep, held = stratified_holdout(labels, self.val_fraction, self.seed)
        else:
            keep, held = list(range(len(labels))), []
        subset = stratified_subset([labels[k] for k in keep], self.max_train_samples, self.seed)
        return [keep[i] for i in subset], held

    def _check_labels(self, ex: Examples) -> Examples:
        """Every label must be in the label map: a clear error naming the file and row otherwise."""
        known = set(self.label_names)
        origin = "data.labels" if self._given_labels else "train"
        for i, lab in enumerate(ex.labels):
            if lab is not None and lab not in known:
                near = [k for k in self.label_names if k.strip() == lab.strip()]
                hint = (
                    f" (it differs from {near[0]!r} only in surrounding whitespace)" if near else ""
                )
                raise DataError(
                    f"{ex.where(i)}: label {lab!r} does not occur in {origin}{hint}; known labels: {self.label_names}"
                )
        return ex

    def _dataset(self, split: str) -> Dataset:
        if split not in self.splits:
            self.setup({"train": "fit", "val": "validate"}.get(split, split))
        return RowDataset(self.splits[split].texts, self.label_ids(split))

    def _loader(self, dataset, batch_size: int, shuffle: bool = False, sampler=None) -> DataLoader:
        collate = Collator(self.tokenizers() if self.features == "online" else None)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def _stream_loader(self) -> StreamLoader:
        """The training stream: held-out and unsampled rows dropped, reshuffled each epoch."""
        source = self._source("train")
        keep = None
        if self._source("val") is None or self.max_train_samples is not None:
            keep = bytearray(len(self._train_labels()))
            for i in self._train_rows()[0]:
                keep[i] = 1
        stream = ShardedStream(
            source, self.label_names, self.text_field, self.label_field, self.seed, keep=keep
        )
        return StreamLoader(
            stream,
            epoch=lambda: self.trainer.current_epoch if self.trainer is not None else None,
            batch_size=self.batch_size,
            collate_fn=Collator(self.tokenizers()),
            num_workers=self.num_workers,
        )

    def _stream_rows(self, rows: list[int]) -> Examples:
        """Rows of the train stream (the held-out validation rows), read in one pass."""
        return read_rows(self._source("train"), rows, self.text_field, self.label_field)


def _as_written(
    sources: dict[str, SplitSource | None], labels: list[str]
) -> dict[str, SplitSource | None]:
    """`data.labels` given as a named dataset's labels as written ("0", "1": checkpoints trained before the
    labels had names) reads that dataset's labels as written."""
    out = dict(sources)
    for split, source in sources.items():
        if source is not None and source.label_names:
            written = {raw for raw, _ in source.label_names}
            if set(labels) <= written:
                out[split] = replace(source, label_names=())
    return out


class UnpaddedSampler(DistributedSampler):
    """Rows `rank::world` of a map-style dataset, in order, without padding: ranks may differ by one row.

    A `DistributedSampler` subclass, so Lightning injects none of its own; every rank must still get at
    least one row (DDP syncs buffers on the first forward of an evaluation).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        if len(dataset) < num_replicas:
            raise DataError(
                f"an evaluation split of {len(dataset)} row(s) cannot give each of {num_replicas} processes a row; "
                "evaluate on fewer devices"
            )
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


class RowDataset(Dataset):
    """Rows of one split: index, text, class id."""

    def __init__(self, texts: list[str], labels: list[int]) -> None:
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "text": self.texts[i], "label": self.labels[i]}


class Collator:
    """Batch rows; with tokenizers, add `inputs[encoder] = {input_ids, attention_mask}` padded per batch
    (`encoders.forward.tokenize`, the tokenisation of the feature cache and the `Classifier`)."""

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
                batch["inputs"][key] = tokenize(tok, texts, max_len)
        return batch
