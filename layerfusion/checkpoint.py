"""The layerfusion checkpoint format: its section, the encoder ids, reading and checking (no Lightning)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from layerfusion.errors import CheckpointError

SECTION = "layerfusion"
"""The checkpoint key of layerfusion's own section (beside Lightning's `state_dict`, `hyper_parameters`)."""
SECTION_KEYS = ("encoders", "label_names", "head", "selection")
"""What the section holds: encoder ids (`encoder_ids`), class names, head kind, layers read per encoder."""
HEAD_PREFIX = "head."
"""Every `state_dict` key starts with it: a checkpoint holds the head's weights only."""
CLASSIFIER_CONFIG = "classifier.json"
"""The file that marks a folder written by `Classifier.save` (named in errors for such a folder)."""


def encoder_ids(encoders) -> dict[str, dict]:
    """What identifies each encoder (`{key: FrozenEncoder}`) in a checkpoint (`FrozenEncoder.identity`:
    name, revision, weight and tokenizer hashes, max length, depth)."""
    return {k: e.identity() for k, e in encoders.items()}


def section(encoders, label_names: list[str], head: str, selection: dict[str, list[int]]) -> dict:
    """The layerfusion section of a checkpoint."""
    return {
        "encoders": encoder_ids(encoders),
        "label_names": list(label_names),
        "head": head,
        "selection": selection,
    }


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A layerfusion checkpoint loaded on the CPU (tensors and containers only, no code), checked to be one."""
    path = Path(path)
    if path.is_dir():
        hint = (
            " (a folder written by Classifier.save: load it with Classifier.load)"
            if (path / CLASSIFIER_CONFIG).is_file()
            else ""
        )
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as err:  # torch.load fails in many ways on other files (IndexError, EOFError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in reason:
            reason = "it holds pickled Python objects, not only tensors"
        raise CheckpointError(
            f"{path} is not a layerfusion checkpoint: torch.load cannot read it ({reason[:200]})"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} is not a layerfusion checkpoint: it holds a {type(ckpt).__name__}, not a checkpoint dict"
        )
    if SECTION not in ckpt:
        what = (
            "a Lightning checkpoint of another model"
            if "pytorch-lightning_version" in ckpt
            else "a PyTorch file from another program"
        )
        keys = ", ".join(map(str, list(ckpt)[:6]))
        raise CheckpointError(
            f"{path} was not written by layerfusion: {what} (no 'layerfusion' section; keys: {keys})"
        )
    problem = section_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} is not a usable layerfusion checkpoint: {problem}")
    return ckpt


def section_problem(ckpt: dict) -> str | None:
    """What makes `ckpt` not a layerfusion checkpoint (a missing section key, weights outside the head),
    or None."""
    meta = ckpt.get(SECTION) or {}
    missing = [k for k in SECTION_KEYS if k not in meta]
    if missing:
        return f"its 'layerfusion' section lacks {missing}"
    if "state_dict" not in ckpt:
        return "it has no state_dict"
    foreign = [k for k in ckpt["state_dict"] if not k.startswith(HEAD_PREFIX)]
    if foreign:
        return f"its state_dict has weights outside the head (e.g. {foreign[:3]})"
    return None
