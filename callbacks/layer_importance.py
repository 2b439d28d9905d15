"""Score every layer of every encoder on the train and dev splits; write and log the table."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from layerfusion.callbacks.tracking import log_image, log_metrics, log_table
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from layerfusion import plots
from layerfusion.data.sources import stratified_subset
from layerfusion.errors import ConfigError
from layerfusion.files import write_json
from layerfusion.importance import (
    COLUMNS,
    LayerScore,
    check_weights,
    combine,
    encoder_attention_entropy,
    fit_scoring_head,
    grad_norm_sums,
    mark_selected,
    probe_accuracy,
    standardise,
    write_table,
)
from layerfusion.importance.scores import __doc__ as SCORE_FORMULA
from layerfusion.importance.scores import jsonable, row_from_dict

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 2: scored on samples of train and dev


class LayerImportance(Callback):
    """Per (encoder, layer): gradient magnitude, attention entropy, dev probe accuracy and a combined score.

    Runs once at the start of `fit`, in `setup`, on a seeded sample of the train split (`grad_norm`,
    probes; at most `max_train_rows` rows) and of the dev split (probe accuracy; at most `max_dev_rows`
    rows), each stratified by class and kept in row order; attention entropy runs the encoders on a
    seeded sample of the scored train texts. Only the sampled rows are extracted (every layer, through
    `pl_module.extract_split`); when a sample is the whole split its texts are the split's texts, so the
    module's own extraction of that split reads the same cache entry. The test split is never read. The
    table is kept on `self.table` (and in checkpoints), written as `importance.csv` / `importance.json`
    to the run directory at `on_fit_start` (rank 0), with the `selected` column set from the head's
    layers, and sent to the loggers.

    - `grad_norm`: a linear head over all layers of all encoders is fitted (L-BFGS) on the z-scored train
      sample; then the mean over the sampled train rows of `||d loss_i / d x_i[layer]||_2`.
    - `attention_entropy`: mean over valid query tokens of the head-mean entropy (nats) of the attention
      over valid keys, eager attention for the sample only; NaN for layer 0 (no attention).
    - `probe_acc`: accuracy on the dev sample of a linear probe (L-BFGS, z-scored features) fitted on the
      train sample, on that layer alone.
    - `score`: see `layerfusion.importance.scores` — per-encoder min-max of each component, weighted mean
      with `|weight|`, a negative weight prefers low values, NaN components drop out; in [0, 1].

    Under DDP the sampled rows' extraction is sharded over ranks (as any split's), the probes are shared
    out over ranks and summed, each rank computes gradient norms and entropy over its share of rows,
    sums and counts are reduced, and rank 0's table is broadcast: every rank holds the same table, equal
    (up to float summation order) to a single-process run.

    Args:
        weights: weight per component (`probe_acc`, `grad_norm`, `attention_entropy`), merged over the
            defaults {probe_acc: 1.0, grad_norm: 0.5, attention_entropy: -0.25}; 0 switches one off, a
            negative weight prefers low values (sharp attention).
        l2: L2 penalty of the probes and of the scoring head (on the mean cross-entropy).
        max_iter: L-BFGS iterations of each probe and of the scoring head.
        max_train_rows: score on a seeded, stratified sample of this many train rows (None = all). The
            default 10,000 keeps every paper dataset's train split whole (SST-2 6,920; MR, R8, R52
            fewer) and bounds extraction and memory on large corpora (`sst2_glue`: 67,349); a 4,000-row
            sample picks the full-data top-3 exactly in 0 to 2 of 5 seeds on SST-2 and MR (0 to 3 of 3
            on R8 and R52), giving up at most 1.03 points of dev probe accuracy
            (`results/selection_stability/`).
        max_dev_rows: the same for the dev split (None = all); the default 2,000 keeps every paper
            dataset's dev split whole (at most 872 rows).
        attention_samples: train texts (seeded sample of the scored rows) run with eager attention; 0
            skips attention entropy.
        attention_batch_size: batch size of that run.
        batch_size: rows per batch of the gradient pass.
        seed: seed of the row samples.
        dirpath: where to write the table (default: `trainer.default_root_dir`, the run directory, as
            `RunReport` does).
        filename: file stem of the table (`<filename>.csv`, `<filename>.json`).
        cache: reuse the components scored before under the same inputs: the feature cache keys of the
            sampled train and dev texts (encoder weights, tokenizer, texts, ...), their labels, the
            scoring settings above (sample sizes and seed included). Stored beside the feature cache
            (`model.cache_dir/importance`); a corrupt or mismatched entry is rebuilt. A hit extracts
            nothing. The weights are applied afresh on every read.
    """

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        l2: float = 1e-3,
        max_iter: int = 100,
        max_train_rows: int | None = 10_000,
        max_dev_rows: int | None = 2_000,
        attention_samples: int = 256,
        attention_batch_size: int = 32,
        batch_size: int = 256,
        seed: int = 0,
        dirpath: str | None = None,
        filename: str = "importance",
        cache: bool = True,
    ) -> None:
        self.weights = check_weights(weights)
        if attention_samples == 0 and not any(
            w for c, w in self.weights.items() if c != "attention_entropy"
        ):
            raise ConfigError(
                "LayerImportance: attention_samples=0 switches attention entropy off, and every other "
                f"component has weight 0 ({self.weights}): no layer could be scored"
            )
        if l2 < 0:
            raise ConfigError(f"LayerImportance: l2 must be >= 0, got {l2}")
        for name, value, low in (
            ("max_iter", max_iter, 1),
            ("attention_samples", attention_samples, 0),
            ("attention_batch_size", attention_batch_size, 1),
            ("batch_size", batch_size, 1),
        ):
            if int(value) != value or value < low:
                raise ConfigError(
                    f"LayerImportance: {name} must be an integer >= {low}, got {value!r}"
                )
        for name, value in (("max_train_rows", max_train_rows), ("max_dev_rows", max_dev_rows)):
            if value is not None and (int(value) != value or value < 2):
                raise ConfigError(
                    f"LayerImportance: {name} must be an integer >= 2 or None, got {value!r}"
                )
        if not filename or "/" in filename:
            raise ConfigError(
                f"LayerImportance: filename must be a plain file stem, got {filename!r}"
            )
        self.l2, self.max_iter = float(l2), int(max_iter)
        self.max_train_rows = None if max_train_rows is None else int(max_train_rows)
        self.max_dev_rows = None if max_dev_rows is None else int(max_dev_rows)
        self.attention_samples, self.attention_batch_size = (
            int(attention_samples),
            int(attention_batch_size),
        )
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.dirpath, self.filename = dirpath, filename
        self.cache = bool(cache)
        self.cache_path: Path | None = None  # the scores' entry in the cache (set by `compute`)
        self.table: list[LayerScore] | None = None
        self.seconds: dict[str, float] = {}
        self.paths: tuple[Path, Path] | None = None
        self._fresh = False  # the table was computed in the current fit

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.compute(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.table is None:
            return
        mark_selected(self.table, pl_module.selection)
        if trainer.is_global_zero:
            directory = Path(self.dirpath or trainer.default_root_dir)
            meta = {
                "weights": self.weights,
                "selection": pl_module.selection,
                "seconds": self.seconds,
                "formula": SCORE_FORMULA.strip(),
            }
            self.paths = write_table(self.table, directory, self.filename, meta)
            log.info("layer importance table: %s", self.paths[0])
            self.log_table(trainer, self.table, directory)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fresh = False

    @override
    def state_dict(self) -> dict:
        return {
            "weights": self.weights,
            "table": [asdict(r) for r in self.table] if self.table is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        table = state_dict.get("table")
        self.table = [LayerScore(**r) for r in table] if table is not None else None

    # -- scoring ---------------------------------------------------------------------------------

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[LayerScore]:
        """The importance table of this fit (computed on first call, then reused; `LayerSelection` calls it too)."""
        if self._fresh and self.table is not None:
            return self.table
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "label_ids"):
            raise ConfigError(
                "LayerImportance needs the TextClassificationDataModule (trainer.fit(model, datamodule=...))"
            )
        if getattr(dm, "streaming", False):
            raise ConfigError(
                "LayerImportance needs a map-style train split: set data.streaming=false"
            )
        strategy, device = trainer.strategy, trainer.strategy.root_device
        dm.setup("fit")
        samples = {
            "train": self._sample(dm, "train", self.max_train_rows),
            "val": self._sample(dm, "val", self.max_dev_rows),
        }
        key = self._key(pl_module, samples, device)
        cached = self._read_cache(pl_module, key) if trainer.is_global_zero and self.cache else None
        cached = strategy.broadcast(cached, src=0)
        if cached is not None:
            self.table = combine(cached, self.weights)
            self.seconds = {}
            self._fresh = True
            log.info(
                "layer importance from the cache (%s): %s", self.cache_path, _summary(self.table)
            )
            return self.table
        start = time.perf_counter()
        # every layer of the sampled rows only (the module extracts the selected layers of whole splits)
        feats = {s: pl_module.extract_split(texts, s, device) for s, (texts, _) in samples.items()}
        self.seconds["extract"] = time.perf_counter() - start
        train_y = torch.tensor(samples["train"][1], dtype=torch.long, device=device)
        dev_y = torch.tensor(samples["val"][1], dtype=torch.long, device=device)
        num_classes = len(pl_module.label_names)
        # z-score each (layer, dim) with the train sample's statistics; out of place: the features may be
        # the cache's own tensors (float32 cache on the CPU), which the module may read afterwards
        train, dev = {}, {}
        for e, x in feats["train"].items():
            train[e], dev[e] = standardise(
                _rows(x).to(device, torch.float32), _rows(feats["val"][e]).to(device, torch.float32)
            )
        del feats
        rank, world = trainer.global_rank, trainer.world_size

        start = time.perf_counter()
        pairs = [(e, layer) for e, x in train.items() for layer in range(x.shape[1])]
        acc = torch.zeros(len(pairs), dtype=torch.float64, device=device)
        for j, (e, layer) in enumerate(pairs):
            if (
                j % world == rank
            ):  # each rank fits its share of the probes on the whole train sample
                acc[j] = probe_accuracy(
                    train[e][:, layer],
                    train_y,
                    dev[e][:, layer],
                    dev_y,
                    num_classes,
                    self.l2,
                    self.max_iter,
                )
        acc = strategy.reduce(acc, reduce_op="sum")
        self.seconds["probe_acc"] = time.perf_counter() - start

        start = time.perf_counter()
        head = fit_scoring_head(train, train_y, num_classes, self.l2, self.max_iter)
        if world > 1:  # identical fits on every rank; make them bit-identical
            weights = strategy.broadcast({k: v.cpu() for k, v in head.state_dict().items()}, src=0)
            head.load_state_dict(weights)
        mine = torch.arange(rank, len(train_y), world, device=device)
        grad_sums = grad_norm_sums(head, train, train_y, mine, self.batch_size)
        grad = {e: strategy.reduce(s, reduce_op="sum") / len(train_y) for e, s in grad_sums.items()}
        self.seconds["grad_norm"] = time.perf_counter() - start

        start = time.perf_counter()
        entropy = self._attention_entropy(trainer, pl_module, samples["train"][0], device)
        self.seconds["attention_entropy"] = time.perf_counter() - start

        table = [
            LayerScore(
                encoder=e,
                layer=layer,
                grad_norm=grad[e][layer].item(),
                attention_entropy=entropy[e][layer].item(),
                probe_acc=acc[j].item(),
            )
            for j, (e, layer) in enumerate(pairs)
        ]
        self.table = strategy.broadcast(combine(table, self.weights), src=0)
        self._fresh = True
        if trainer.is_global_zero and self.cache:
            write_json(
                self.cache_path, {"key": key, "rows": [jsonable(asdict(r)) for r in self.table]}
            )
        log.info("layer importance (%.1f s): %s", sum(self.seconds.values()), _summary(self.table))
        return self.table

    def _sample(self, dm, split: str, limit: int | None) -> tuple[list[str], list[int]]:
        """(texts, class ids) of the rows of `split` scored: all (the split's own text list), or a seeded
        sample of `limit` rows stratified by class, in row order."""
        texts, labels = dm.texts(split), dm.label_ids(split)
        if limit is None or limit >= len(texts):
            return texts, labels
        rows = stratified_subset(labels, limit, self.seed)
        return [texts[i] for i in rows], [labels[i] for i in rows]

    def _key(self, pl_module, samples: dict[str, tuple[list[str], list[int]]], device) -> dict:
        """Everything the scores depend on (the combined score's weights are applied after reading)."""
        # the feature cache's keys name what the sampled rows' features depend on (weights, tokenizer,
        # texts, ...); the spec adds the encoder's settings as configured (e.g. its compute precision)
        features = {
            e: {
                "spec": asdict(enc.spec),
                **{
                    s: pl_module.cache.key(enc, texts, s, device)
                    for s, (texts, _) in samples.items()
                },
            }
            for e, enc in pl_module.encoders.items()
        }
        labels = {
            s: hashlib.sha256(json.dumps(ids).encode()).hexdigest()
            for s, (_, ids) in samples.items()
        }
        settings = {
            k: getattr(self, k)
            for k in (
                "l2",
                "max_iter",
                "max_train_rows",
                "max_dev_rows",
                "attention_samples",
                "attention_batch_size",
                "batch_size",
                "seed",
            )
        }
        return {
            "format": CACHE_FORMAT,
            "features": features,
            "labels": labels,
            "label_names": list(pl_module.label_names),
            "settings": settings,
            "device": device.type,
        }

    def _read_cache(self, pl_module, key: dict) -> list[LayerScore] | None:
        """The cached components for `key`, or None (a damaged or mismatched entry is reported and rebuilt)."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.cache_path = Path(pl_module.cache.root) / "importance" / f"{digest}.json"
        if not self.cache_path.is_file():
            return None
        try:
            entry = json.loads(self.cache_path.read_text(encoding="utf-8"))
            if entry["key"] != key:
                raise ValueError("its key differs from this run's")
            rows = [row_from_dict(r) for r in entry["rows"]]
            expected = [
                (e, i) for e, enc in pl_module.encoders.items() for i in range(enc.num_layers)
            ]
            if [(r.encoder, r.layer) for r in rows] != expected:
                raise ValueError("its rows are not this run's encoders and layers")
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning(
                "importance cache entry %s is unusable (%s): scoring again", self.cache_path, err
            )
            return None
        return rows

    def _attention_entropy(
        self, trainer, pl_module, texts: list[str], device
    ) -> dict[str, torch.Tensor]:
        """`{encoder: [L+1]}` mean attention entropy over a seeded sample of the scored train `texts`; NaN
        for layer 0."""
        g = torch.Generator().manual_seed(self.seed + 1)
        sample = torch.randperm(len(texts), generator=g)[: self.attention_samples].sort().values
        mine = sample[trainer.global_rank :: trainer.world_size].tolist()
        out = {}
        for key, encoder in pl_module.encoders.items():
            if self.attention_samples == 0:
                out[key] = torch.full((encoder.num_layers,), math.nan, dtype=torch.float64)
                continue
            failure = None
            try:
                sums, count = encoder_attention_entropy(
                    encoder, [texts[i] for i in mine], self.attention_batch_size, device
                )
            except RuntimeError as err:  # stop every rank, not only those that hold texts
                failure, sums = (
                    err,
                    torch.zeros(encoder.num_layers, dtype=torch.float64, device=device),
                )
                count = torch.zeros((), dtype=torch.float64, device=device)
            failed = trainer.strategy.reduce(
                torch.tensor(failure is not None, dtype=torch.float64, device=device),
                reduce_op="sum",
            )
            if failed > 0:
                if failure is not None:
                    raise failure
                raise RuntimeError(
                    f"attention entropy of encoder {key!r} failed on another rank (see its error)"
                )
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
            count = trainer.strategy.reduce(count, reduce_op="sum")
            mean = (sums / count).cpu() if count > 0 else torch.full_like(sums, math.nan).cpu()
            mean[0] = math.nan  # the embedding output has no attention
            out[key] = mean
        return out

    # -- logging ---------------------------------------------------------------------------------

    def log_table(self, trainer: L.Trainer, table: list[LayerScore], directory: Path) -> None:
        """Send the table to the loggers (rank 0): each layer's score as a metric, the whole table as a
        W&B Table, and an encoder x layer heatmap of the score (selected layers boxed), also written
        to `directory` as `<filename>_heatmap.png`."""
        rows = [{c: getattr(r, c) for c in COLUMNS} for r in table]
        log_metrics(
            trainer, {f"importance/{r.encoder}/layer_{r.layer:02d}": r.score for r in table}
        )
        log_table(trainer, "layer_importance", rows)
        heatmap = plots.importance_heatmap(rows, directory / f"{self.filename}_heatmap.png")
        log_image(trainer, "layer_importance_heatmap", heatmap)


def _summary(table: list[LayerScore]) -> str:
    """The three best layers per encoder, for the log."""
    parts = []
    for e in dict.fromkeys(r.encoder for r in table):
        best = sorted((r for r in table if r.encoder == e), key=lambda r: -r.score)[:3]
        parts.append(f"{e}: " + ", ".join(f"L{r.layer}={r.score:.2f}" for r in best))
    return "; ".join(parts)


def _rows(features) -> torch.Tensor:
    """All rows of a feature store as one tensor `[N, L, d]` (a tensor, or a store indexed by row tensors)."""
    return features[torch.arange(features.shape[0])]


def stratified_rows(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`layerfusion.data.sources.stratified_subset` for a tensor of class ids."""
    return torch.tensor(stratified_subset(labels.tolist(), n, seed), dtype=torch.long)
