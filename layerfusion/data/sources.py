"""Where a dataset's splits come from: named datasets, local `{split}.jsonl` directories, hub ids."""

from __future__ import annotations

import os
import random
from pathlib import Path

from layerfusion.data.jsonl import DataError, Examples, read_jsonl
from layerfusion.errors import ConfigError

DATA_ENV = "LAYERFUSION_DATA"
BUNDLED_DIR = Path(__file__).parent / "bundled"

# name -> file stem of each split; val None = held out from train (seeded, stratified).
NAMED_DATASETS: dict[str, dict[str, str | None]] = {
    "sst2": {"train": "train", "val": "dev", "test": "test"},
    # LLMEmbed's setting: GLUE train, GLUE validation used as the test set.
    "sst2_glue": {"train": "train", "val": None, "test": "dev"},
    "mr": {"train": "train", "val": None, "test": "test"},
    "r8": {"train": "train", "val": None, "test": "test"},
    "r52": {"train": "train", "val": None, "test": "test"},
}
LOCAL_SPLIT_STEMS = {"train": ("train",), "val": ("dev", "validation", "val"), "test": ("test",)}


def load_splits(
    dataset: str, data_dir: str | None = None, text_field: str = "text", label_field: str = "label"
) -> dict[str, Examples | None]:
    """Load train / val / test (val or test may be None) of a named dataset, a local directory or a hub id."""
    files = split_files(dataset, data_dir)
    if files is not None:
        return {
            split: read_jsonl(path, text_field, label_field) if path is not None else None
            for split, path in files.items()
        }
    return _load_hub(dataset, text_field, label_field)


def split_files(dataset: str, data_dir: str | None = None) -> dict[str, Path | None] | None:
    """The local file of each split, or None when `dataset` is a hub id."""
    if dataset in NAMED_DATASETS:
        root = _named_root(dataset, data_dir)
        stems = {k: (v,) if v else () for k, v in NAMED_DATASETS[dataset].items()}
    elif Path(dataset).expanduser().is_dir():
        root = Path(dataset).expanduser()
        stems = LOCAL_SPLIT_STEMS
    elif _looks_like_path(dataset) or "/" not in dataset:
        raise DataError(
            f"unknown dataset {dataset!r}: not a known name ({', '.join(NAMED_DATASETS)}), "
            "not an existing directory of {split}.jsonl files, and not a hub id of the form 'org/name'"
        )
    else:
        return None
    files: dict[str, Path | None] = {}
    for split, options in stems.items():
        found = [
            p
            for stem in options
            for p in (root / f"{stem}.jsonl", root / f"{stem}.jsonl.gz")
            if p.is_file()
        ]
        files[split] = found[0] if found else None
    if files["train"] is None:
        raise DataError(
            f"{root}: no train.jsonl (or train.jsonl.gz); a dataset directory needs at least a train split"
        )
    for split in ("val", "test"):
        if files[split] is None and dataset in NAMED_DATASETS and NAMED_DATASETS[dataset][split]:
            raise DataError(
                f"{root}: missing {NAMED_DATASETS[dataset][split]}.jsonl for the {split} split of {dataset!r}"
            )
    return files


def stratified_holdout(
    labels: list[str | None], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split row indices into (keep, held_out): a seeded, per-label `fraction` of each class is held out."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {fraction}")
    by_label: dict[str | None, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    rng = random.Random(seed)
    held: list[int] = []
    for label in sorted(by_label, key=str):
        rows = by_label[label]
        rng.shuffle(rows)
        n_held = min(len(rows) - 1, max(1, round(len(rows) * fraction))) if len(rows) > 1 else 0
        held.extend(rows[:n_held])
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def sorted_labels(labels: list[str | None]) -> list[str]:
    """Distinct labels, sorted (numerically when all are integers)."""
    distinct = {lab for lab in labels if lab is not None}
    if all(lab.lstrip("-").isdigit() for lab in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


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


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith((".jsonl", ".json", ".gz"))


def _load_hub(dataset: str, text_field: str, label_field: str) -> dict[str, Examples | None]:
    """Load a hub dataset through `datasets`, keeping train / validation / test."""
    import datasets

    try:
        dd = datasets.load_dataset(dataset)
    except Exception as err:  # datasets raises many types; the user needs the id and the cause
        raise DataError(
            f"cannot load hub dataset {dataset!r}: {type(err).__name__}: {err}"
        ) from err
    names = {"train": ("train",), "val": ("validation", "dev", "val"), "test": ("test",)}
    out: dict[str, Examples | None] = {}
    for split, options in names.items():
        key = next((k for k in options if k in dd), None)
        out[split] = (
            _hub_examples(dd[key], f"{dataset}[{key}]", text_field, label_field) if key else None
        )
    if out["train"] is None:
        raise DataError(f"hub dataset {dataset!r} has no 'train' split (splits: {list(dd)})")
    return out


def _hub_examples(ds, source: str, text_field: str, label_field: str) -> Examples:
    """Convert one `datasets.Dataset` split into Examples (ClassLabel ids become their names)."""
    for field in (text_field, label_field):
        if field not in ds.column_names:
            raise DataError(f"{source}: missing column {field!r} (columns: {ds.column_names})")
    feature = ds.features[label_field]
    names = getattr(feature, "names", None)
    labels = [
        None if lab is None or (names and lab < 0) else (names[lab] if names else str(lab))
        for lab in ds[label_field]
    ]
    return Examples(list(ds[text_field]), labels, source)
