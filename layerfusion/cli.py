"""`LightningCLI` for layerfusion: `fit | validate | test | predict --config ...`."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.offline import no_loading_bars
from layerfusion.errors import ConfigError
from layerfusion.module import LayerFusionModule

# `--ckpt_path` values Lightning resolves itself (not file names)
SPECIAL_CKPT_PATHS = ("best", "last", "hpc")


class LayerFusionCLI(LightningCLI):
    """The Lightning CLI with the data and the model linked: encoders and feature mode flow to the
    data (one tokenizer per encoder), the label set flows from the data to the model. The console
    shows progress and real warnings, not the noise listed in `quiet_console`."""

    def __init__(self, *args, **kwargs) -> None:
        quiet_console()
        kwargs.setdefault("parser_class", LayerFusionArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.encoders", "data.encoders", apply_on="parse")
        parser.link_arguments("model.features", "data.features", apply_on="parse")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check `--ckpt_path` before Lightning merges its hyperparameters over the config and
        before any encoder loads: a missing, foreign or broken file is one clear error, and so is a
        checkpoint whose encoders differ from the config's on `name` or `trust_remote_code` (Lightning's
        merge would otherwise let a checkpoint load other models or turn remote code on)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        ckpt = config.get("ckpt_path") if config is not None else None
        if ckpt and ckpt not in SPECIAL_CKPT_PATHS and "://" not in str(ckpt):
            from layerfusion.checkpoint import read_checkpoint

            checkpoint = read_checkpoint(ckpt)
            check_checkpoint_encoders(checkpoint, config.get("model"), ckpt)

    def before_instantiate_classes(self) -> None:
        """`${trainer.default_root_dir}` in any path of the config names the run directory."""
        from layerfusion.run_paths import resolve_run_paths

        resolve_run_paths(self.config[self.subcommand] if self.subcommand else self.config)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer without transformers' per-encoder "Loading weights" bars."""
        with no_loading_bars():
            super().instantiate_classes()
        for logger in self.trainer.loggers:
            _prepare_wandb(logger)


def check_checkpoint_encoders(checkpoint: dict, model_config, path) -> None:
    """Refuse a checkpoint whose encoders differ from the config's on `name`, `revision` or
    `trust_remote_code` (Lightning would otherwise load the checkpoint's values over the config's)."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("encoders")
    if saved is None or model_config is None:
        return
    configured = [_as_dict(e) for e in (model_config.get("encoders") or [])]
    saved = [_as_dict(e) for e in saved]
    if len(saved) != len(configured):
        raise ConfigError(
            f"checkpoint {path} was trained with {len(saved)} encoder(s) "
            f"{[e.get('name') for e in saved]}; the config has {len(configured)} "
            f"{[e.get('name') for e in configured]}"
        )
    for i, (theirs, ours) in enumerate(zip(saved, configured)):
        for field in ("name", "revision", "trust_remote_code"):
            default = False if field == "trust_remote_code" else None
            if theirs.get(field, default) != ours.get(field, default):
                raise ConfigError(
                    f"checkpoint {path} has model.encoders[{i}].{field}={theirs.get(field, default)!r}; "
                    f"the config has {ours.get(field, default)!r}. Lightning would load the checkpoint's "
                    f"value over yours: set it in your config if you mean it"
                )


def _as_dict(value) -> dict:
    """An encoder entry (dict, jsonargparse Namespace or EncoderSpec) as a plain dict."""
    if isinstance(value, dict):
        return value
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return dict(vars(value))


class LayerFusionArgumentParser(LightningArgumentParser):
    """Lightning's parser, except that an unknown `model.head` gets the one-line error every other bad value gets."""

    def error(self, message: str, ex: Exception | None = None):
        match = _UNKNOWN_HEAD.search(message)
        if match:
            from layerfusion.fusion.heads import HEADS

            raise ConfigError(
                f"model.head: unknown head {match.group(1).strip()!r}; choose one of {', '.join(HEADS)}"
            )
        super().error(message, ex)


# jsonargparse's message for a value outside the `HeadKind` Literal of `model.head`
_UNKNOWN_HEAD = re.compile(
    r'key "model\.head":\s*Expected a typing\.Literal\[[^\]]*\]\. Got value: (.*)'
)


class LogConfigCallback(SaveConfigCallback):
    """Save `config.yaml` to the log dir (Lightning's default) and log the full resolved config to
    every logger (W&B run config, CSV `hparams.yaml`). Runs on rank 0 only: no collectives here."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = json.loads(self.parser.dump(self.config, skip_unset=False, format="json"))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


def cli_main(args=None) -> LayerFusionCLI:
    """Run the CLI (`args` None = sys.argv)."""
    log_to_stderr()
    return LayerFusionCLI(
        LayerFusionModule,
        TextClassificationDataModule,
        args=args,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def build_cli(
    args: dict | list[str], cli_class: type[LayerFusionCLI] | None = None, **kwargs
) -> LayerFusionCLI:
    """A `LayerFusionCLI` (or `cli_class`) over `args` (a config dict or a command line), built but not
    run (unless `run=True`), as `layerfusion fit` builds it; the process's own `sys.argv` is ignored.
    `kwargs` go to the CLI (defaults: no saved config, no automatic optimizers)."""
    kwargs = {
        "run": False,
        "save_config_callback": None,
        "auto_configure_optimizers": False,
        **kwargs,
    }
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return (cli_class or LayerFusionCLI)(
            LayerFusionModule, TextClassificationDataModule, args=args, **kwargs
        )
    finally:
        sys.argv = argv


class ParseOnlyCLI(LayerFusionCLI):
    """Parses and validates a config; seeds nothing, instantiates nothing, runs nothing."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def resolved_config(cfg: dict) -> dict:
    """The config dict `cfg` fully resolved by the parser (defaults filled in), nothing instantiated."""
    cli = build_cli(cfg, ParseOnlyCLI)
    return json.loads(cli.parser.dump(cli.config, skip_unset=False, format="json"))


def resolved_config_hash(cfg: dict) -> str:
    """SHA-256 of the fully resolved config `cfg`, its logger excluded (a run's identity)."""
    import hashlib

    resolved = resolved_config(cfg)
    resolved.get("trainer", {}).pop("logger", None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def log_to_stderr() -> None:
    """Show layerfusion's INFO messages (extraction progress, cache hits) like Lightning's own."""
    logger = logging.getLogger("layerfusion")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[layerfusion] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each message, not as it was when the handler was made (a
    notebook, a test runner or a server may replace it, and the old one may be closed by then)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def quiet_console() -> None:
    """Silence the console noise a user can neither act on nor needs, each at its exact message.

    - Lightning's advertisement for litlogger / litmodels ("💡 Tip: For seamless cloud ...").
    - Lightning's "Found N module(s) in eval mode at the start of training": the frozen encoders are
      in eval mode on purpose (`FrozenEncoder.train` keeps them there); the head trains in train mode.
    - torch's FutureWarning that Lightning 2.6's own pytree helper uses the deprecated `LeafSpec`.
    """
    from lightning.pytorch.utilities.warnings import PossibleUserWarning
    from lightning_utilities.core import rank_zero

    if not any(isinstance(f, _DropTips) for f in rank_zero.log.filters):
        rank_zero.log.addFilter(_DropTips())
    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
        category=PossibleUserWarning,
    )
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


class _DropTips(logging.Filter):
    """Drop Lightning's "💡 Tip: For seamless cloud ..." advertisements (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: For seamless cloud")


def _prepare_wandb(logger) -> None:
    """Apply the W&B convention (offline unless WANDB_MODE=online) and remove the causes of two W&B
    warnings that come from Lightning's defaults, not from the user.

    `offline: true` in a config means "offline unless WANDB_MODE=online" here, as in `reproduce` and
    `analyze` (Lightning itself would set WANDB_MODE=dryrun and ignore the environment).

    Lightning passes `anonymous=None` to `wandb.init`, and W&B warns that the setting has no effect
    whenever it is passed; W&B looks for a git repository from the run's `dir` and warns when that
    directory does not exist yet, so it is created first.
    """
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or logger._experiment is not None:
        return
    if os.environ.get("WANDB_MODE") == "online":
        logger._offline = False
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
