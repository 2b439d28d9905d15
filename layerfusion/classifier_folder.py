"""The classifier's saved forms: the folder `Classifier.save` writes and `load` reads (classifier.json,
head.safetensors, README.md; no pickle), and the same settings built from a `fit` checkpoint."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from layerfusion.checkpoint import CLASSIFIER_CONFIG, read_checkpoint
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import CheckpointError
from layerfusion.files import file_sha256, fsync_dir, remove_temp_leftovers, temp_path
from layerfusion.fusion.heads import HEADS, build_head

FORMAT, VERSION = "layerfusion-classifier", 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = CLASSIFIER_CONFIG, "head.safetensors", "README.md"


def check_config(config: dict[str, Any]) -> None:
    """Fail with the missing or wrong setting rather than deep inside the model."""
    needed = ("label_names", "head", "head_args", "layers", "encoders", "encoder_ids")
    missing = [k for k in needed if k not in config]
    if missing:
        raise CheckpointError(f"classifier settings lack {missing}")
    if config["head"] not in HEADS:
        raise CheckpointError(
            f"classifier has head {config['head']!r}, which this layerfusion does not know; "
            f"known heads: {', '.join(HEADS)}"
        )
    known = {f.name for f in fields(EncoderSpec)}
    unknown = sorted({k for e in config["encoders"] for k in e} - known)
    if unknown:
        raise CheckpointError(
            f"classifier encoder settings have fields this layerfusion lacks: {unknown}"
        )
    keys = [EncoderSpec(**e).key for e in config["encoders"]]
    if set(keys) != set(config["layers"]):
        raise CheckpointError(
            f"classifier layers are given for {sorted(config['layers'])}, encoders are {keys}"
        )


def read_fit_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The classifier settings and head weights in a `fit` checkpoint (`.ckpt`)."""
    ckpt = read_checkpoint(path)
    hparams, meta = ckpt.get("hyper_parameters") or {}, ckpt["layerfusion"]
    if "encoders" not in hparams:
        raise CheckpointError(
            f"checkpoint {path}: no encoder settings (hyper_parameters.encoders) to rebuild it from"
        )
    # the head's own hyperparameters: build_head's keyword arguments beyond its structure
    structure = {"kind", "dims", "num_layers", "layers", "num_classes"}
    head_args = {
        k: hparams[k]
        for k in inspect.signature(build_head).parameters
        if k not in structure and k in hparams
    }
    config = {
        "format": FORMAT,
        "version": VERSION,
        "label_names": list(meta["label_names"]),
        "head": meta["head"],
        "head_args": head_args,
        "layers": {k: list(v) for k, v in meta["selection"].items()},
        "encoders": [dict(e) for e in hparams["encoders"]],
        "encoder_ids": dict(meta["encoders"]),
        "trained": _training_summary(ckpt, path),
    }
    state = {k.removeprefix("head."): v for k, v in ckpt["state_dict"].items()}
    return config, state


def read_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The classifier settings and head weights in a folder written by `write_folder`, checked to match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(directory)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory written by Classifier.save")
    if not config_path.is_file():
        hint = (
            " (save writes it last: a save into this folder did not finish; save it again)"
            if (folder / WEIGHTS_FILE).is_file()
            else ""
        )
        raise CheckpointError(
            f"{folder} has no {CONFIG_FILE}: it is not a folder written by Classifier.save{hint}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: not a layerfusion classifier (format != {FORMAT!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(
            f"{config_path}: format version {config.get('version')!r}; this layerfusion reads {VERSION}"
        )
    try:
        state = load_file(folder / WEIGHTS_FILE)
    except (FileNotFoundError, SafetensorError) as err:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE}: cannot read the head weights ({err})"
        ) from None
    expected = config.get("head_sha256")  # absent in folders saved before it was recorded
    if expected is not None and (actual := file_sha256(folder / WEIGHTS_FILE)) != expected:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} is not the head {CONFIG_FILE} was saved with (SHA-256 "
            f"{actual[:12]}..., recorded {expected[:12]}...): the file was "
            "replaced after the save; save the classifier again"
        )
    return config, state


def write_folder(
    directory: str | os.PathLike,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    card: str,
    overwrite_readme: bool = False,
) -> Path:
    """Write the head (safetensors), its settings (classifier.json) and a model card (README.md) as a set.

    Every file is first written under a temporary name, then classifier.json is removed, the others are
    renamed into place, and classifier.json (which records the head's SHA-256) comes last. `read_folder`
    requires it, so a save interrupted at any point never leaves a loadable folder that pairs a new head
    with an old config. An existing README.md is replaced only when a previous save wrote it unchanged,
    or `overwrite_readme`.
    """
    from safetensors.torch import save_file

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    card_path, config_path = folder / CARD_FILE, folder / CONFIG_FILE
    write_card = overwrite_readme or not card_path.exists() or _our_card(folder)
    if not write_card:
        warnings.warn(
            f"{card_path} is kept: it was not written by Classifier.save (or was edited since); "
            "pass overwrite_readme=True to replace it with the model card",
            stacklevel=3,
        )
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    for name in (WEIGHTS_FILE, CARD_FILE, CONFIG_FILE):  # of saves killed earlier (dead pids)
        remove_temp_leftovers(folder / name)
    staged: dict[Path, Path] = {}
    try:
        head_tmp = staged[folder / WEIGHTS_FILE] = temp_path(folder / WEIGHTS_FILE)
        save_file(state, str(head_tmp), {"format": "pt"})
        config = {k: v for k, v in config.items() if k not in ("head_sha256", "card_sha256")}
        config["head_sha256"] = file_sha256(head_tmp)
        if write_card:
            card_tmp = staged[card_path] = temp_path(card_path)
            card_tmp.write_text(card, encoding="utf-8")
            config["card_sha256"] = file_sha256(card_tmp)
        config_tmp = staged[config_path] = temp_path(config_path)
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        config_tmp.write_text(text, encoding="utf-8")
        for tmp in staged.values():  # the new content is on disk before any name changes
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        config_path.unlink(missing_ok=True)  # from here until the last rename: not loadable
        fsync_dir(folder)
        for final, tmp in staged.items():  # classifier.json last (dicts keep insertion order)
            os.replace(tmp, final)
        fsync_dir(folder)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return folder


def model_card(config: dict[str, Any], encoders: dict) -> str:
    """A short README.md: what the classifier predicts, from which encoders (`{key: FrozenEncoder}`) and
    layers, how to use it."""
    layers, label_names = config["layers"], config["label_names"]
    rows = [
        f"| `{e.spec.key}` | `{e.spec.name}` | {', '.join(map(str, layers[k]))} "
        f"(of 0..{e.num_layers - 1}) | {e.spec.pooling} | {e.max_length} |"
        for k, e in encoders.items()
    ]
    args = ", ".join(f"{k} {v}" for k, v in config["head_args"].items())
    trained = config.get("trained") or {}
    score = (
        f"\nBest `{trained['monitor']}` during training: {trained['best_score']:.4f}.\n"
        if trained.get("monitor") and trained.get("best_score") is not None
        else ""
    )
    return f"""# layerfusion classifier

A `{config["head"]}` fusion head ({args}) over frozen pretrained encoders, predicting
{len(label_names)} labels: {", ".join(f"`{n}`" for n in label_names)}.
{score}
| encoder | model | layers read (0 = embeddings) | pooling | max tokens |
|---|---|---|---|---|
{chr(10).join(rows)}

The encoder weights are not in this folder: each is loaded by its model name (a local directory,
`$LAYERFUSION_MODELS`, or the Hugging Face hub) and checked against the SHA-256 of the weights the
head was trained on (`encoder_ids` in `{CONFIG_FILE}`). The head is `{WEIGHTS_FILE}`.

```python
from layerfusion import Classifier

clf = Classifier.load("path/to/this/folder")  # device="cuda", compute_dtype="bfloat16", ...
clf.predict(["a text to classify"])  # array of labels (scikit-learn); predict_proba: [N, C]
clf(["a text to classify"], top_k=2)  # [[{{"label": ..., "score": ...}}, ...]] (transformers pipeline)
clf.encode(["a text to classify"])  # [N, width] fused representation (sentence-transformers)
```

Command line: `python -m layerfusion classify path/to/this/folder "a text" "another"`.
"""


def _training_summary(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Where the head came from: the checkpoint, its epoch, the best monitored score."""
    out: dict[str, Any] = {"checkpoint": str(path), "epoch": ckpt.get("epoch")}
    for name, state in (ckpt.get("callbacks") or {}).items():
        if str(name).startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            out["monitor"] = state.get("monitor")
            out["best_score"] = float(state["best_model_score"])
            break
    return out


def _our_card(folder: Path) -> bool:
    """Whether the folder's README.md is the model card a previous save wrote, unedited."""
    try:
        recorded = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("card_sha256")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded is not None and file_sha256(folder / CARD_FILE) == recorded
