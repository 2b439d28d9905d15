"""Before any head run: every encoder's features extracted (or found in the cache) and the layers scored
and selected on train/dev."""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
from pathlib import Path

from layerfusion.errors import ConfigError
from layerfusion.files import write_json
from layerfusion.reproduce.grid import SPLITS, _is, _spec_key

log = logging.getLogger("layerfusion.reproduce")


def extract_features(cfg: dict, run_dir: Path) -> dict[str, dict]:
    """Extract (or find cached) every split of each encoder alone; its extraction peak memory.

    Figures are kept in `<run_dir>/extraction.json` from the invocation that really extracted; a warm
    cache keeps the earlier figures (NaN when there are none)."""
    import torch

    from layerfusion.memory import peak_memory_mb, reset_peak_memory

    path = run_dir / "extraction.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    figures = {}
    for spec in cfg["model"]["encoders"]:
        key = _spec_key(spec)
        c = _bare(cfg, run_dir)
        c["model"].update(encoders=[spec], head="gated", layers=None)
        trainer, model, dm = instantiate(c)
        dm.setup("fit")
        dm.setup("test")
        gc.collect()
        reset_peak_memory()
        built = 0.0
        with torch.no_grad():
            for split in SPLITS:
                model.extract_split(dm.texts(split), split, trainer.strategy.root_device)
                built += model.cache.last_build_seconds or 0.0
        if built > 0:
            figures[key] = {"peak_mb": peak_memory_mb(), "build_s": built}
        else:
            figures[key] = known.get(key, {"peak_mb": math.nan, "build_s": math.nan})
        del trainer, model, dm
        gc.collect()
    write_json(path, figures)
    return figures


def importance(
    cfg: dict, name: str, share: float, out: Path, run_dir: Path
) -> tuple[dict[str, dict[str, list[int]]], dict[str, int], dict[str, list[Path]]]:
    """Score the layers on train/dev (no head training): the selections, each encoder's depth, and
    each encoder's feature-cache entries of train/dev/test."""
    from layerfusion.callbacks import LayerImportance, LayerSelection
    from layerfusion.importance import ranked, scores_by_encoder, select_cumulative

    c = _bare(cfg, run_dir)
    callbacks = [
        cb
        for cb in cfg["trainer"].get("callbacks", [])
        if _is(cb, "LayerImportance", "LayerSelection")
    ]
    if not any(_is(cb, "LayerImportance") for cb in callbacks):
        raise ConfigError(f"{name}: the experiment config needs a LayerImportance callback")
    callbacks = copy.deepcopy(callbacks)
    for cb in callbacks:
        if _is(cb, "LayerImportance"):
            cb.setdefault("init_args", {}).update(
                dirpath=str(out / "paper_importance"), filename=name
            )
    c["trainer"]["callbacks"] = callbacks
    c["model"]["head"] = "gated"
    c["model"]["layers"] = None
    trainer, model, dm = instantiate(c)
    trainer.fit(model, datamodule=dm)
    imp = next(cb for cb in trainer.callbacks if isinstance(cb, LayerImportance))
    sel = next((cb for cb in trainer.callbacks if isinstance(cb, LayerSelection)), None)
    scores = scores_by_encoder(imp.table)
    probe = {k: {r.layer: r.probe_acc for r in imp.table if r.encoder == k} for k in scores}
    selections = {
        "top_k": sel.selection if sel is not None else model.selection,
        "cumulative": select_cumulative(scores, share),
        "best": {k: [ranked(p)[0]] for k, p in probe.items()},
    }
    depth = {k: e.num_layers for k, e in model.encoders.items()}
    dm.setup("test")
    entries = {
        # the all-layer entries `extract_features` built, keyed with this device's compute dtype
        k: [
            model.cache.entry_dir(model.cache.key(e, dm.texts(s), s, trainer.strategy.root_device))
            for s in SPLITS
        ]
        for k, e in model.encoders.items()
    }
    log.info("%s selections: %s", name, selections)
    del trainer, model, dm
    gc.collect()
    return selections, depth, entries


def extraction_seconds(entries: list[Path]) -> float:
    """Cold extraction time recorded in the manifests of these cache entries (NaN when one lacks it)."""
    from layerfusion.features.cache import read_manifest

    return sum(read_manifest(e).get("build_seconds", math.nan) for e in entries)


def instantiate(cfg: dict):
    """Trainer, model and datamodule from a config dict, exactly as `layerfusion fit --config` builds them."""
    from layerfusion.cli import build_cli

    cli = build_cli(cfg)
    return cli.trainer, cli.model, cli.datamodule


def _bare(cfg: dict, run_dir: Path) -> dict:
    """`cfg` as a quiet, logger-free, callback-free trainer for extraction and scoring."""
    c = copy.deepcopy(cfg)
    c["trainer"].update(
        callbacks=[],
        limit_train_batches=0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    return c
