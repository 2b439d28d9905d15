"""`LayerFusionModule`: frozen tapped encoders, a trainable fusion head, metrics, head-only checkpoints."""

from __future__ import annotations

import atexit
import functools
import logging
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from layerfusion.checkpoint import SECTION, encoder_ids, section
from layerfusion.data.sources import STAGE_SPLITS
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder, encoders_mismatch
from layerfusion.errors import ConfigError
from layerfusion.features.cache import (
    CHUNK_ROWS,
    TOKEN_BUDGET,
    CachedFeatures,
    CacheDtype,
    FeatureCache,
)
from layerfusion.fusion.heads import HeadKind, _safe, build_head

log = logging.getLogger(__name__)


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Destroy this process's process group when it exits (once per process), as Lightning does for NCCL
    only: a Gloo group left to the interpreter's finalization can abort the process with "terminate called
    without an active exception" (SIGABRT) after a successful run, at random (its worker threads still
    hold tensors when the interpreter is torn down; see pytorch/pytorch#179291)."""

    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


class LayerFusionModule(L.LightningModule):
    """Classifier over every tapped layer of several frozen encoders; only the head trains.

    Args:
        encoders: the frozen encoders (hub id or local directory each, pooling, max length, dtype).
        label_names: class names, index = class id (linked from `data.label_names` by the CLI).
        head: `gated` (the method) or a baseline: `single_layer`, `last_layer`, `mean_layers`, `concat`.
        layers: selected layers per encoder key (0 = embeddings, negative counts from the end); None = all.
        hidden: the head's common width.
        dropout: dropout inside the head.
        lr: AdamW learning rate of the head.
        weight_decay: AdamW weight decay.
        features: `cached` extracts every split once to the feature cache (only the layers the head reads,
            each encoder stopping at the deepest); `online` runs the encoders every step.
        cache_dir: where cached features live.
        cache_dtype: storage dtype of cached features.
        extract_token_budget: padded tokens per extraction batch (rows x longest row, length-sorted batches):
            bounds extraction memory whatever the text lengths. None = no bound.
        extract_batch_size: rows per extraction batch at most (None = as many as the token budget allows).
        cache_chunk_rows: rows per cache chunk: the unit a killed extraction resumes from.
    """

    def __init__(
        self,
        encoders: list[EncoderSpec],
        label_names: list[str] | None = None,
        head: HeadKind = "gated",
        layers: dict[str, list[int]] | None = None,
        hidden: int = 256,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        features: Literal["cached", "online"] = "cached",
        cache_dir: str = "~/.cache/layerfusion/features",
        cache_dtype: CacheDtype = "float16",
        extract_token_budget: int | None = TOKEN_BUDGET,
        extract_batch_size: int | None = None,
        cache_chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        super().__init__()
        if not encoders:
            raise ConfigError("model.encoders is empty: give at least one encoder")
        if not label_names:
            raise ConfigError(
                "model.label_names is empty: it comes from the data (data.label_names)"
            )
        specs = [s if isinstance(s, EncoderSpec) else EncoderSpec(**s) for s in encoders]
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise ConfigError(
                f"encoder keys must be unique, got {keys}; set `alias` on one of them"
            )
        if features not in ("cached", "online"):
            raise ConfigError(f"features must be 'cached' or 'online', got {features!r}")
        self.save_hyperparameters(
            {
                "encoders": [asdict(s) for s in specs],
                "label_names": list(label_names),
                "head": head,
                "layers": layers,
                "hidden": hidden,
                "dropout": dropout,
                "lr": lr,
                "weight_decay": weight_decay,
                "features": features,
            }
        )
        self.encoders = nn.ModuleDict({s.key: FrozenEncoder(s) for s in specs})
        self.label_names = list(label_names)
        self.cache = FeatureCache(
            cache_dir, cache_dtype, extract_batch_size, extract_token_budget, cache_chunk_rows
        )
        self.head = self.build_head(layers)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(len(label_names), average="micro"),
                "f1": MulticlassF1Score(len(label_names), average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        # evaluation losses as metrics: the mean over every row of every rank (a logged value with
        # sync_dist averages the ranks' means, which differs when ranks hold unequal row counts)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.features: dict[str, dict[str, CachedFeatures]] = {}
        self.extract_seconds: dict[str, float] = {}

    # -- structure -------------------------------------------------------------------------------

    def build_head(self, layers: dict[str, list[int]] | None) -> nn.Module:
        """A fresh head of the configured kind over `layers` (the current layer selection)."""
        return build_head(
            self.hparams.head,
            dims={k: e.hidden_size for k, e in self.encoders.items()},
            num_layers={k: e.num_layers for k, e in self.encoders.items()},
            layers=layers,
            num_classes=len(self.label_names),
            hidden=self.hparams.hidden,
            dropout=self.hparams.dropout,
        )

    @property
    def selection(self) -> dict[str, list[int]]:
        """The layers the head reads, per encoder."""
        return {k: list(v) for k, v in self.head.layers.items()}

    def set_selection(self, layers: dict[str, list[int]]) -> None:
        """Rebuild the head over `layers` (its weights start fresh)."""
        self.head = self.build_head(layers).to(self.device)

    # -- features --------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Fit: extract (or read from the cache) the train and val features of the selected layers.

        Callbacks' `setup` (`LayerSelection`) runs before this, so the selection is final here. Other
        stages extract in `on_*_start`, after Lightning has restored a `ckpt_path` checkpoint (and with it
        the head's selection). The encoders' weight fingerprints are taken here in every stage: FSDP wraps
        (and shards) the model after `setup`, and checkpoints are written and checked after that. Under a
        process group, the group is destroyed when this process exits (`_destroy_process_group_at_exit`)."""
        for encoder in self.encoders.values():  # before any wrapping: FSDP shards the weights
            encoder.fingerprint()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _destroy_process_group_at_exit()
        if stage == "fit":
            self.prepare_features("fit")

    def on_validation_start(self) -> None:
        self.prepare_features(self.trainer.state.fn.value)  # in fit: held since setup

    def on_test_start(self) -> None:
        self.prepare_features("test")

    def on_predict_start(self) -> None:
        self.prepare_features("predict")

    def prepare_features(self, stage: str) -> None:
        """Make `self.features[split]` hold the selected layers of each split of `stage` (idempotent: held
        features that include them are narrowed, not read again)."""
        if self.hparams.features != "cached":
            return
        dm = self.trainer.datamodule
        dm.setup(stage)
        device = self.trainer.strategy.root_device
        needed = self.selection
        for split in STAGE_SPLITS.get(stage, []):
            held = self.features.get(split)
            if held is not None and all(set(v) <= set(held[k].layers) for k, v in needed.items()):
                self.features[split] = {k: f.select(needed[k]) for k, f in held.items()}
                continue
            # predicting on the test split reads the test split's cache entry
            name = "test" if split == "predict" and dm.predict_path is None else split
            self.features[split] = self.extract_split(dm.texts(split), name, device, needed)

    def extract_split(
        self,
        texts: list[str],
        split: str,
        device: torch.device | str = "cpu",
        layers: dict[str, list[int]] | None = None,
    ) -> dict[str, CachedFeatures]:
        """Cached features `{encoder: [N, len(layers), d]}` of `texts`: `layers[encoder]` (absolute indices;
        None or an encoder left out = all layers), extracted with early exit at the deepest one where no
        entry holds them. Under DDP the ranks share the extraction out by chunks. The build time adds up
        in `extract_seconds[split]`."""
        trainer = self._trainer
        dist = trainer.strategy if trainer is not None else None
        out, seconds = {}, 0.0
        for key, encoder in self.encoders.items():
            wanted = (layers or {}).get(key)
            out[key] = self.cache.load_or_build(encoder, texts, split, device, wanted, dist)
            seconds += self.cache.last_build_seconds
        self.extract_seconds[split] = self.extract_seconds.get(split, 0.0) + seconds
        return out

    def batch_features(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        """`{encoder: [B, depth+1, d]}` fp32 for a batch, up to the deepest selected layer: computed by the
        encoders (which stop there), or the cached selected layers at their absolute positions (the
        layers the head does not read are zeros)."""
        if self.hparams.features == "online":
            depths = {k: max(layers) for k, layers in self.selection.items()}
            return {
                k: enc(**batch["inputs"][k], depth=depths[k]) for k, enc in self.encoders.items()
            }
        held = self.features.get(split)
        if held is None or any(
            not set(v) <= set(held[k].layers) for k, v in self.selection.items()
        ):  # the selection changed after extraction (e.g. restored from a checkpoint)
            self.prepare_features(self.trainer.state.fn.value)
            held = self.features[split]
        rows = batch["index"].cpu()
        # FSDP moves the weights itself, not through `self.to`: `self.device` may still say cpu
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        out = {}
        for k, feats in held.items():
            placed = torch.zeros(
                (len(rows), max(feats.layers) + 1, feats.shape[2]),
                dtype=torch.float32,
                device=device,
            )
            placed[:, feats.layers] = feats[rows].to(device, torch.float32)
            out[k] = placed
        return out

    # -- steps -----------------------------------------------------------------------------------

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features)

    def model_step(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(self.batch_features(batch, split))
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logits = self.model_step(batch, "train")
        self.train_metrics.update(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def on_train_epoch_end(self) -> None:
        # once per epoch, not `log_dict(self.train_metrics)` at every step: the same epoch values, and
        # Lightning's per-call bookkeeping was 1/8 of a head run's time on cached features
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self(self.batch_features(batch, "predict"))
        return {"index": batch["index"], "probs": torch.softmax(logits.float(), dim=-1)}

    def _eval_step(self, batch: dict, split: str, metrics: MetricCollection) -> dict:
        loss, logits = self.model_step(batch, split)
        metrics.update(logits, batch["labels"])
        mean = self.val_loss if split == "val" else self.test_loss
        mean.update(loss.detach(), weight=len(logits))
        self.log(f"{split}_loss", mean, prog_bar=True, batch_size=len(logits))
        self.log_dict(metrics, prog_bar=True, batch_size=len(logits))
        return {"preds": logits.argmax(-1)}

    def on_train_epoch_start(self) -> None:
        dataset = (
            self.trainer.train_dataloader.dataset
            if self.trainer.train_dataloader is not None
            else None
        )
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def teardown(self, stage: str) -> None:
        """Drop the stage's features and remove the encoders' hooks."""
        self.features.clear()
        for encoder in self.encoders.values():
            encoder.close()

    # -- checkpoints: head only ------------------------------------------------------------------

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path, *args, trust_remote_code: bool = False, **kwargs
    ) -> LayerFusionModule:
        """Lightning's `load_from_checkpoint`, except that the checkpoint's own `trust_remote_code`
        never counts: only this argument (or `encoders` passed here) can let a model run its code."""
        if "encoders" not in kwargs:
            from layerfusion.checkpoint import read_checkpoint

            hparams = read_checkpoint(checkpoint_path).get("hyper_parameters") or {}
            kwargs["encoders"] = [
                {**dict(e), "trust_remote_code": trust_remote_code}
                for e in hparams.get("encoders") or []
            ]
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the head's weights: encoders are frozen and identified by their hash instead."""
        return self.head.state_dict(
            destination=destination, prefix=prefix + "head.", keep_vars=keep_vars
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a head-only state dict (keys `head.*`); a head over other layers is rebuilt first."""
        foreign = [k for k in state_dict if not k.startswith("head.")]
        if foreign:
            raise KeyError(
                f"checkpoint state_dict has keys outside the head (e.g. {foreign[:3]}); not a layerfusion checkpoint"
            )
        state = {k[len("head.") :]: v for k, v in state_dict.items()}
        # the head's `_idx_*` buffers name its layers: rebuild a head over other layers first
        # (ddp_spawn hands the selected head back to the main process as a plain state dict)
        saved = {e: state.get(f"_idx_{_safe(e)}") for e in self.selection}
        saved = {e: idx.tolist() for e, idx in saved.items() if idx is not None}
        if any(saved[e] != self.selection[e] for e in saved):
            self.set_selection({**self.selection, **saved})
        for name, buf in self.head.named_buffers():  # checkpoints saved before the indices were
            state.setdefault(name, buf)
        return self.head.load_state_dict(state, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[SECTION] = section(
            self.encoders, self.label_names, self.hparams.head, self.selection
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("layerfusion")
        if meta is None:
            raise ConfigError(
                "checkpoint has no 'layerfusion' section: it was not written by layerfusion"
            )
        problem = encoders_mismatch(meta["encoders"], self.encoders)
        if problem:
            theirs = {k: v["name"] for k, v in meta["encoders"].items()}
            mine = {k: e.spec.name for k, e in self.encoders.items()}
            raise ConfigError(
                f"checkpoint was trained on encoders {theirs}; this run has {mine}: {problem}"
            )
        if meta["label_names"] != self.label_names:
            raise ConfigError(
                f"checkpoint labels {meta['label_names']} differ from this data's labels {self.label_names}"
            )
        if meta["head"] != self.hparams.head:
            raise ConfigError(
                f"checkpoint has a {meta['head']!r} head; this run is configured with model.head={self.hparams.head!r}"
            )
        if meta["selection"] != self.selection:
            strategy = self._trainer.strategy if self._trainer is not None else None
            if strategy is not None and strategy.restore_checkpoint_after_setup:
                # FSDP & co. restore after wrapping the model and building the optimizer: a head rebuilt
                # now would be outside both (it would never train, and the loaded weights miss it)
                self.check_checkpoint_head(checkpoint)
            log.info("restoring layer selection from checkpoint: %s", meta["selection"])
            self.set_selection(meta["selection"])

    def check_checkpoint_head(self, checkpoint: dict) -> None:
        """Refuse a checkpoint whose head reads other layers than this module's head, or whose weights are
        not exactly this head's: for strategies that load a checkpoint into the wrapped model (FSDP), where
        the head can no longer be rebuilt."""
        meta = checkpoint.get("layerfusion") or {}
        strategy = (
            type(self._trainer.strategy).__name__ if self._trainer is not None else "this strategy"
        )
        if meta.get("selection") is not None and meta["selection"] != self.selection:
            raise ConfigError(
                f"checkpoint's head reads layers {meta['selection']}; this run's head reads "
                f"{self.selection}. {strategy} restores checkpoints after it has wrapped the model, "
                f"too late to rebuild the head: set model.layers to {meta['selection']} (and leave out "
                "LayerSelection) to resume or evaluate this checkpoint"
            )
        ours = set(self.state_dict())
        theirs = set(checkpoint.get("state_dict", {}))
        if theirs != ours:
            raise ConfigError(
                f"checkpoint weights {sorted(theirs ^ ours)[:4]} do not match this run's head; "
                "it was not written by layerfusion for this model"
            )

    def _encoder_ids(self) -> dict[str, dict]:
        """What identifies each encoder in a checkpoint (`FrozenEncoder.identity`)."""
        return encoder_ids(self.encoders)
