"""Where each split comes from (named datasets, local files or directories, `save_to_disk`, hub ids), and the
row rules every mode shares: the held-out validation slice, the stratified subsets, the sorted label map."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from layerfusion.data.readers import (
    FORMATS,
    DataError,
    Examples,
    Row,
    class_names,
    file_format,
    iter_file,
    label_str,
    text_problem,
)
from layerfusion.errors import ConfigError

DATA_ENV = "LAYERFUSION_DATA"
BUNDLED_DIR = Path(__file__).parent / "bundled"
SPLITS = ("train", "val", "test")
# the splits each Lightning stage reads (the DataModule builds them, the module extracts their features)
STAGE_SPLITS = {
    "fit": ["train", "val"],
    "validate": ["val"],
    "test": ["test"],
    "predict": ["predict"],
}

# name -> file stem of each split; val None = held out from train (seeded, stratified).
NAMED_DATASETS: dict[str, dict[str, str | None]] = {
    "sst2": {"train": "train", "val": "dev", "test": "test"},
    # LLMEmbed's setting: GLUE train, GLUE validation used as the test set.
    "sst2_glue": {"train": "train", "val": None, "test": "dev"},
    "mr": {"train": "train", "val": None, "test": "test"},
    "r8": {"train": "train", "val": None, "test": "test"},
    "r52": {"train": "train", "val": None, "test": "test"},
}
# name -> {label as written in its files: the name users see}; the others' labels are words already
LABEL_NAMES: dict[str, dict[str, str]] = {
    name: {"0": "negative", "1": "positive"} for name in ("sst2", "sst2_glue", "mr")
}
# split -> the names it goes by in directories, `data_files` keys, DatasetDicts and hub datasets
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "dev", "val"), "test": ("test",)}
READ_BATCH = 1_000  # rows per batch read from a `datasets` split


@dataclass(frozen=True)
class SplitSource:
    """One split: local files, a split of a `save_to_disk` directory, or a split of a hub dataset.

    Plain data (picklable: it travels to `ddp_spawn` processes and DataLoader workers); nothing is read
    until `rows` or `read` is called.
    """

    kind: str  # "files" | "disk" | "hub"
    location: str  # for messages: the file(s), directory or hub id
    paths: tuple[Path, ...] = ()
    key: str | None = None  # the split's name inside a DatasetDict / hub dataset
    config: str | None = None  # hub dataset configuration (`datasets.load_dataset(path, name)`)
    revision: str | None = None  # hub dataset revision (branch, tag or commit)
    label_names: tuple[
        tuple[str, str], ...
    ] = ()  # label as written -> label users see (named datasets)

    @property
    def name(self) -> str:
        """The split for messages: files, or `location[split]`."""
        return f"{self.location}[{self.key}]" if self.key else self.location

    def rows(
        self, text_field: str, label_field: str | None, require_labels: bool = True
    ) -> Iterator[Row]:
        """Every row, in order, one at a time (hub splits streamed): checked texts, labels by the one rule."""
        if self.kind == "files":
            rows = (
                row
                for path in self.paths
                for row in iter_file(path, text_field, label_field, require_labels)
            )
        else:
            rows = self._dataset_rows(text_field, label_field, require_labels)
        if not self.label_names:
            yield from rows
            return
        names = dict(self.label_names)
        for row in rows:
            yield row._replace(label=names.get(row.label, row.label))

    def read(self, text_field: str, label_field: str, require_labels: bool = True) -> Examples:
        """All rows of this split, in memory."""
        return Examples.collect(self.rows(text_field, label_field, require_labels), self.name)

    def class_names(self, label_field: str) -> list[str] | None:
        """ClassLabel names of the label column (save_to_disk and hub datasets), without reading rows."""
        if self.kind == "files":
            return None
        features = self._dataset(streaming=self.kind == "hub").features
        return class_names(features.get(label_field)) if features else None

    def _dataset(self, streaming: bool = False):
        import datasets

        if self.kind == "disk":
            loaded = datasets.load_from_disk(self.location)
            return loaded[self.key] if self.key else loaded
        with quiet_builders():
            return _hub_call(
                _hub_name(self.location, self.config, self.revision),
                lambda: datasets.load_dataset(
                    self.location,
                    self.config,
                    split=self.key,
                    revision=self.revision,
                    streaming=streaming,
                ),
            )

    def _dataset_rows(
        self, text_field: str, label_field: str | None, require_labels: bool
    ) -> Iterator[Row]:
        ds = self._dataset(streaming=self.kind == "hub")
        columns = list(ds.column_names or ds.features or [])
        if columns and text_field not in columns:
            raise DataError(
                f"{self.name}: no field '{text_field}' (fields: {columns}); set data.text_field to the text column"
            )
        if columns and require_labels and label_field not in columns:
            raise DataError(
                f"{self.name}: no field '{label_field}' (fields: {columns}); set data.label_field to the label column"
            )
        names = class_names(ds.features.get(label_field)) if ds.features else None
        i = 0
        try:
            for batch in ds.iter(batch_size=READ_BATCH):
                if text_field not in batch:
                    raise DataError(
                        f"{self.name}: no field '{text_field}' (fields: {list(batch)}); "
                        "set data.text_field to the text column"
                    )
                texts = batch[text_field]
                labels = batch.get(label_field) or [None] * len(texts)
                for text, value in zip(texts, labels):
                    yield self._row(i, text, value, names, text_field, label_field, require_labels)
                    i += 1
        except DataError:
            raise
        except Exception as err:  # the builders raise many types while streaming
            raise DataError(f"{self.name}: cannot read ({type(err).__name__}: {err})") from err
        if i == 0:
            raise DataError(f"{self.name}: no examples (the split is empty)")

    def _row(self, i, text, value, names, text_field, label_field, require_labels) -> Row:
        where = f"{self.name}, row {i + 1}"
        problem = text_problem(text, text_field)
        if problem:
            raise DataError(f"{where}: {problem}")
        try:
            label = label_str(value, names)
        except ValueError as err:
            raise DataError(f"{where}: field '{label_field}' {err}") from None
        if label is None and require_labels:
            if names and value is not None:
                raise DataError(
                    f"{where}: no gold labels (the label is hidden, -1, as in GLUE test splits); "
                    "evaluate on a labelled split, or use `predict`"
                )
            raise DataError(f"{where}: field '{label_field}' is null; expected a label")
        return Row(text, label, self.name, 0, i)


def resolve_splits(
    dataset: str | None = None,
    data_dir: str | None = None,
    train_path: str | None = None,
    val_path: str | None = None,
    test_path: str | None = None,
    data_files: dict[str, str | list[str]] | None = None,
    dataset_config_name: str | None = None,
    revision: str | None = None,
) -> dict[str, SplitSource | None]:
    """The source of train / val / test (val or test None when absent).

    A named dataset (`sst2`, ...) comes whole: mixed with split files of your own it would validate or test
    your model on its rows, so that is an error. A directory, file or hub id in `dataset` may have single
    splits replaced by per-split files.
    """
    explicit = _explicit_files(train_path, val_path, test_path, data_files)
    if dataset in NAMED_DATASETS and explicit:
        keys = _explicit_keys(train_path, val_path, test_path, data_files)
        given = " and ".join(keys)
        raise ConfigError(
            f"data.dataset is the named dataset {dataset!r} and {given} give{'s' if len(keys) == 1 else ''} "
            "split files of your own: a run "
            f"would train, validate or test on a mix of both. Use one: set data.dataset to null "
            f"(--data.dataset null) to use your files, or drop {given}"
        )
    if dataset is None and explicit.get("train") is None:
        dataset = "sst2"
    if (dataset_config_name or revision) and (dataset is None or dataset in NAMED_DATASETS):
        raise ConfigError(
            "data.dataset_config_name and data.revision select a hub dataset's configuration and version; "
            f"data.dataset is {dataset!r}, not a hub id"
        )
    out = (
        _dataset_splits(dataset, data_dir, dataset_config_name, revision)
        if dataset is not None
        else dict.fromkeys(SPLITS)
    )
    out.update(explicit)
    if out["train"] is None:
        raise ConfigError(
            "no train split: set data.train_path (or data.data_files.train) or data.dataset"
        )
    return out


def stratified_holdout(
    labels: list[str | None], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split row indices into (keep, held_out): a seeded, per-label `fraction` of each class is held out."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    held: list[int] = []
    for rows in _by_label(labels):
        rng.shuffle(rows)
        n_held = min(len(rows) - 1, max(1, round(len(rows) * fraction))) if len(rows) > 1 else 0
        held.extend(rows[:n_held])
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def stratified_subset(labels: Sequence[Hashable], n: int | None, seed: int) -> list[int]:
    """A seeded subset of `n` row indices (sorted) with each class's share of `labels`, every class kept
    while `n` allows (largest remainders fill up to exactly `n`), or all rows when `n` is None or not
    smaller. The one sampler of the data limits and of the importance samples."""
    if n is None or n >= len(labels):
        return list(range(len(labels)))
    import torch

    index = {c: i for i, c in enumerate(sorted(set(labels), key=lambda c: (c is None, c)))}
    ids = torch.tensor([index[c] for c in labels])
    g = torch.Generator().manual_seed(seed)
    classes, counts = ids.unique(return_counts=True)
    exact = counts.double() * n / len(ids)
    take = exact.floor().long().clamp_min(1 if n >= len(classes) else 0).minimum(counts)
    order = (exact - exact.floor()).argsort(descending=True, stable=True).tolist()
    while take.sum() < n:  # hand out the remaining rows by the largest remainders, then round-robin
        for i in order:
            if take.sum() < n and take[i] < counts[i]:
                take[i] += 1
    while take.sum() > n:  # the floor of one row per class overshot: trim the largest classes
        take[take.argmax()] -= 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = (ids == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(picked).sort().values.tolist()


def sorted_labels(labels) -> list[str]:
    """Distinct labels, sorted (numerically when all are integers, ties such as "1" / "01" by text)."""
    distinct = {lab for lab in labels if lab is not None}
    by_stripped: dict[str, str] = {}
    for lab in sorted(distinct):
        other = by_stripped.setdefault(lab.strip(), lab)
        if other != lab:
            raise DataError(
                f"labels {other!r} and {lab!r} differ only in surrounding whitespace; "
                "make them one label in the data (or list the intended labels in data.labels)"
            )
    if all(lab.lstrip("-").isdigit() for lab in distinct):
        return sorted(distinct, key=lambda lab: (int(lab), lab))
    return sorted(distinct)


# -- helpers -----------------------------------------------------------------------------------------


def _explicit_files(train_path, val_path, test_path, data_files) -> dict[str, SplitSource]:
    out: dict[str, SplitSource] = {}
    for key, value in (data_files or {}).items():
        split = next((s for s, names in SPLIT_NAMES.items() if key in names), None)
        if split is None:
            raise ConfigError(
                f"data.data_files: unknown split {key!r}; use train, validation (or dev, val) and test"
            )
        out[split] = path_source(value, f"data.data_files.{key}")
    for split, value in (("train", train_path), ("val", val_path), ("test", test_path)):
        if value is not None:
            if split in out:
                raise ConfigError(
                    f"data.{split}_path and data.data_files both give the {split} split"
                )
            out[split] = path_source(value, f"data.{split}_path")
    return out


def _explicit_keys(train_path, val_path, test_path, data_files) -> list[str]:
    keys = [
        f"data.{s}_path"
        for s, v in (("train", train_path), ("val", val_path), ("test", test_path))
        if v
    ]
    return keys + (["data.data_files"] if data_files else [])


def path_source(value: str | list[str], key: str) -> SplitSource:
    """A split from a file, a list of files, or a `Dataset.save_to_disk` directory."""
    values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    paths = tuple(Path(v).expanduser() for v in values)
    if not paths:
        raise ConfigError(f"{key}: no files given")
    for path in paths:
        if len(paths) == 1 and (path / "state.json").is_file():
            return SplitSource("disk", str(path))
        if not path.is_file():
            raise DataError(f"{path}: no such file (from {key})")
        file_format(path)
    return SplitSource("files", ", ".join(map(str, paths)), paths)


def _dataset_splits(
    dataset: str, data_dir: str | None, config: str | None = None, revision: str | None = None
) -> dict[str, SplitSource | None]:
    if dataset in NAMED_DATASETS:
        root = _named_root(dataset, data_dir)
        out = {}
        for split, stem in NAMED_DATASETS[dataset].items():
            if stem is None:
                out[split] = None
                continue
            found = _split_files(root, (stem,))
            if found is None:
                raise DataError(
                    f"{root}: missing {stem}.jsonl for the {split} split of {dataset!r}"
                )
            out[split] = replace(found, label_names=tuple(LABEL_NAMES.get(dataset, {}).items()))
        return out
    path = Path(dataset).expanduser()
    if revision and (path.is_dir() or path.is_file()):
        raise ConfigError(
            f"data.revision selects a version of a hub dataset; {dataset!r} is a local path (check out the "
            "revision you want there instead)"
        )
    if config and path.is_dir():  # a local copy of a hub repository, with its configurations
        return _hub_splits(str(path), config)
    if config and path.is_file():
        raise ConfigError(
            f"data.dataset_config_name selects a hub dataset's configuration; {dataset!r} is a file"
        )
    if path.is_dir():
        return _directory_splits(path)
    if path.is_file():
        return {"train": path_source(dataset, "data.dataset"), "val": None, "test": None}
    if "/" not in dataset and not Path(dataset).suffix:
        raise DataError(
            f"unknown dataset {dataset!r}: not a known name ({', '.join(NAMED_DATASETS)}), "
            "not an existing file or directory, and not a hub id of the form 'org/name'"
        )
    missing = _missing_local_path(dataset)
    if missing:
        raise DataError(f"{dataset}: no such file or directory (data.dataset; {missing})")
    return _hub_splits(dataset, config, revision)


def _missing_local_path(dataset: str) -> str | None:
    """Why `dataset` is a local path that does not exist rather than a hub id (None: it may be a hub id)."""
    parts = dataset.split("/")
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix.lower() in (*FORMATS, ".gz"):
        return "a hub id has the form 'org/name'"
    if len(parts) != 2 or not all(parts):
        return "a hub id has the form 'org/name', with one '/'"
    if Path(parts[0]).expanduser().is_dir():
        return f"{parts[0]}/ is a local directory; a hub id has the form 'org/name'"
    return None


def _directory_splits(root: Path) -> dict[str, SplitSource | None]:
    """A `save_to_disk` directory (DatasetDict or Dataset), or `{train,dev|validation|val,test}.{jsonl,csv,...}`."""
    if (root / "dataset_dict.json").is_file():
        import json

        keys = json.loads((root / "dataset_dict.json").read_text())["splits"]
        out = {
            split: next((SplitSource("disk", str(root), key=k) for k in names if k in keys), None)
            for split, names in SPLIT_NAMES.items()
        }
        if out["train"] is None:
            raise DataError(f"{root}: the saved DatasetDict has no 'train' split (splits: {keys})")
        return out
    if (root / "state.json").is_file():
        return {"train": SplitSource("disk", str(root)), "val": None, "test": None}
    out = {split: _split_files(root, names) for split, names in SPLIT_NAMES.items()}
    if out["train"] is None:
        raise DataError(
            f"{root}: no train file; a dataset directory needs train.jsonl (or .json, .csv, .tsv, .parquet, "
            "text formats optionally .gz), or a directory written by save_to_disk"
        )
    return out


def _split_files(root: Path, stems: tuple[str, ...]) -> SplitSource | None:
    found = [
        root / f"{stem}{ext}{gz}"
        for stem in stems
        for ext in FORMATS
        for gz in ("", ".gz")
        if (root / f"{stem}{ext}{gz}").is_file() and not (ext == ".parquet" and gz)
    ]
    if len(found) > 1:
        raise DataError(
            f"{root}: {len(found)} files for one split ({', '.join(p.name for p in found)}); keep one, "
            "or name them in data.data_files"
        )
    return SplitSource("files", str(found[0]), (found[0],)) if found else None


def _hub_splits(
    dataset: str, config: str | None = None, revision: str | None = None
) -> dict[str, SplitSource | None]:
    import datasets

    with quiet_builders():
        keys = _hub_call(
            _hub_name(dataset, config, revision),
            lambda: datasets.get_dataset_split_names(dataset, config, revision=revision),
        )
    out = {
        split: next(
            (
                SplitSource("hub", dataset, key=k, config=config, revision=revision)
                for k in names
                if k in keys
            ),
            None,
        )
        for split, names in SPLIT_NAMES.items()
    }
    if out["train"] is None:
        raise DataError(f"hub dataset {dataset!r} has no 'train' split (splits: {keys})")
    return out


def _hub_name(dataset: str, config: str | None, revision: str | None) -> str:
    """`'org/name'` with its configuration and revision, for messages."""
    extra = [f"{k} {v!r}" for k, v in (("configuration", config), ("revision", revision)) if v]
    return repr(dataset) + (f" ({', '.join(extra)})" if extra else "")


def _hub_call(dataset: str, fn):
    try:
        return fn()
    except Exception as err:  # datasets raises many types; the user needs the id and the cause
        raise DataError(f"cannot load hub dataset {dataset}: {type(err).__name__}: {err}") from err


def _named_root(name: str, data_dir: str | None) -> Path:
    """The directory of a named dataset: data_dir, then $LAYERFUSION_DATA, then the bundled copy."""
    for base in (data_dir, os.environ.get(DATA_ENV)):
        if base:
            root = Path(base).expanduser() / name
            if not root.is_dir():
                raise DataError(
                    f"{root}: no such directory for dataset {name!r} (from {'data_dir' if base == data_dir else DATA_ENV})"
                )
            return root
    return BUNDLED_DIR / name


def _by_label(labels: list[str | None]) -> list[list[int]]:
    """Row indices grouped by label, groups in sorted label order."""
    by_label: dict[str | None, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    return [by_label[k] for k in sorted(by_label, key=str)]


@contextlib.contextmanager
def quiet_builders() -> Iterator[None]:
    """No `datasets` progress bars while a split is read."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
