"""`LightningCLI` for layerfusion: `fit | validate | test | predict --config ...`."""

from __future__ import annotations

import json
import logging

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.module import LayerFusionModule


class LayerFusionCLI(LightningCLI):
    """The Lightning CLI with the data and the model linked: encoders and feature mode flow to the
    data (one tokenizer per encoder), the label set flows from the data to the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.encoders", "data.encoders", apply_on="parse")
        parser.link_arguments("model.features", "data.features", apply_on="parse")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")


class LogConfigCallback(SaveConfigCallback):
    """Save `config.yaml` to the log dir (Lightning's default) and log the full resolved config to
    every logger (W&B run config, CSV `hparams.yaml`). Runs on rank 0 only: no collectives here."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


def cli_main(args=None) -> LayerFusionCLI:
    """Run the CLI (`args` None = sys.argv)."""
    _log_to_stderr()
    return LayerFusionCLI(
        LayerFusionModule,
        TextClassificationDataModule,
        args=args,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def _log_to_stderr() -> None:
    """Show layerfusion's INFO messages (extraction progress, cache hits) like Lightning's own."""
    logger = logging.getLogger("layerfusion")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[layerfusion] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
