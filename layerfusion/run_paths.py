"""Run paths follow one setting: `${trainer.default_root_dir}` in a config names the run directory.

The shipped configs write the W&B/CSV logger's `save_dir`, the checkpoint folders and the predictions
file as `${trainer.default_root_dir}/...`, so `--trainer.default_root_dir runs/mine` moves them all.
This one placeholder is resolved (after the command line is parsed); no other interpolation is done.

`python -m layerfusion.run_paths CONFIG` prints the monitored ("best") checkpoint a config writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = "${trainer.default_root_dir}"


def resolve_run_paths(config: Any) -> None:
    """Replace ROOT in every string of a parsed config (a jsonargparse Namespace) by its
    `trainer.default_root_dir` (the working directory when unset), in place."""
    trainer = getattr(config, "trainer", None)
    root = getattr(trainer, "default_root_dir", None) or "."
    _replace(config, str(root))


def read_config(config_file: str | Path) -> dict:
    """A run config as a dict, with a file-valued `trainer.callbacks`, `trainer.logger` or
    `trainer.plugins` (a path relative to the config, as the parser reads it) replaced by that file's
    content: what scripts that edit a config read."""
    import yaml

    path = Path(config_file)
    config = yaml.safe_load(path.read_text()) or {}
    trainer = config.get("trainer") or {}
    for key in ("callbacks", "logger", "plugins"):
        value = trainer.get(key)
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            trainer[key] = yaml.safe_load((path.parent / value).read_text())
    return config


def best_checkpoint(config_file: str | Path) -> str:
    """The checkpoint file of the config's monitored `ModelCheckpoint` (the one `make fit` tests)."""
    trainer = read_config(config_file).get("trainer") or {}
    root = str(trainer.get("default_root_dir") or ".")
    for cb in trainer.get("callbacks") or []:
        args = cb.get("init_args") or {} if isinstance(cb, dict) else {}
        if cb.get("class_path", "").endswith("ModelCheckpoint") and args.get("monitor"):
            dirpath = str(args.get("dirpath") or f"{root}/checkpoints").replace(ROOT, root)
            return f"{dirpath}/{args.get('filename') or 'best'}.ckpt"
    raise SystemExit(f"{config_file}: no ModelCheckpoint with a `monitor` in trainer.callbacks")


def _replace(node: Any, root: str) -> Any:
    """`node` with ROOT replaced in every string it holds (containers are changed in place)."""
    if isinstance(node, str):
        return node.replace(ROOT, root)
    if isinstance(node, list):
        node[:] = [_replace(v, root) for v in node]
    elif isinstance(node, dict):
        for k, v in node.items():
            node[k] = _replace(v, root)
    elif hasattr(node, "__dict__") and type(node).__name__ == "Namespace":
        for k, v in vars(node).items():
            setattr(node, k, _replace(v, root))
    return node


if __name__ == "__main__":
    print(best_checkpoint(sys.argv[1]))
