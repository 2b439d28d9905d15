"""Texts to pooled per-layer features for the cache: chunks through the one batched forward
(`encoders.forward`: token-budget batches, the tapped forward, early exit), NaN/inf checks."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch

from layerfusion.encoders.forward import forward_batches, token_batches
from layerfusion.encoders.frozen import FrozenEncoder
from layerfusion.features.entry import FeatureCacheError

FEATURES_VERSION = 1
"""The version of the code that turns texts into pooled features (tokenisation, batching, tap placement,
pooling, early exit, compute precision). It is part of every cache key: bump it when a change to that code
changes any feature value, so caches built by the old code are not used. A change that keeps every value
(a refactor) keeps it, so users' caches stay valid: tests/test_features_version.py records a hash of that
code and fails until one of the two is done on purpose (see its docstring)."""
TOKEN_BUDGET = 4096
"""Padded tokens per extraction batch (rows x longest row). Measured in benchmarks/scale.py (MPNet, every
layer, 2-core CPU): on R8 documents of 512 tokens the peak RSS growth was 460 MiB at 4096 tokens, 901 at
8192, 1017 at 16384 and 1910 with the former fixed 64 rows (32,768 tokens); on SST-2 sentences 4096
tokens (~130 rows a batch) ran as fast as 64 rows, 8192 and 16384 were 8% and 70% slower. On a GPU a
larger budget may be faster (not measured here): `model.extract_token_budget`."""
FLOAT16_MAX = float(np.finfo(np.float16).max)


def extract_chunk(
    encoder: FrozenEncoder,
    texts: Sequence[str],
    layers: list[int],
    device,
    token_budget: int | None,
    max_rows: int | None,
    where: Callable[[int], str] = lambda r: f"row {r}",
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """Pooled `layers` of `texts` as fp32 `[N, len(layers), d]` (the encoder stops at the deepest layer);
    NaN or inf from the encoder raises a `FeatureCacheError` naming `where(row)`."""
    out = np.empty((len(texts), len(layers), encoder.hidden_size), np.float32)
    for rows, feats in forward_batches(encoder, texts, layers, device, token_budget, max_rows):
        if not torch.isfinite(feats).all():
            bad = ~torch.isfinite(feats)
            r, j = (int(v) for v in bad.nonzero()[0][:2])
            kind = "NaN" if feats[r, j].isnan().any() else "inf"
            raise FeatureCacheError(
                f"encoder {encoder.spec.key} gave {kind} at layer {layers[j]} for {where(rows[r])} "
                f"(text {texts[rows[r]][:60]!r}): the encoder's own output is not finite; check its "
                "weights and compute_dtype (e.g. float16 overflow: use bfloat16 or float32)"
            )
        out[rows] = feats.numpy()
        advance(len(rows))
    return out


def extract(
    encoder: FrozenEncoder,
    texts: Sequence[str],
    out: np.ndarray,
    batch_size: int | None,
    device,
    desc: str = "features",
    sort_by_length: bool = True,
    token_budget: int | None = None,
) -> None:
    """Fill `out[i]` with the pooled layers 0..k of `texts[i]` (`out` is `[N, k+1, d]`; the encoder stops
    after layer k), in length-sorted batches (longest first) of at most `batch_size` rows and
    `token_budget` padded tokens. `sort_by_length=False` keeps the given order (only for measuring what
    bucketing saves)."""
    layers = list(range(out.shape[1]))
    with _progress() as bar:
        task = bar.add_task(f"extract {desc}", total=len(texts))
        batches = forward_batches(
            encoder, texts, layers, device, token_budget, batch_size, sort_by_length
        )
        for rows, feats in batches:
            out[rows] = feats.numpy().astype(out.dtype)
            bar.advance(task, len(rows))


def _progress():
    """A rich progress bar with examples/s (drawn on a terminal; the log line after it says the same)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.0f} ex/s" if task.speed else "- ex/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Speed(),
        TimeRemainingColumn(),
        disable=not sys.stderr.isatty(),
    )


__all__ = [
    "FEATURES_VERSION",
    "TOKEN_BUDGET",
    "extract",
    "extract_chunk",
    "forward_batches",
    "token_batches",
]
