"""Texts to pooled per-layer features: token-budget batches, the tapped forward, NaN/inf checks."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from layerfusion.encoders.frozen import FrozenEncoder
from layerfusion.features.entry import FeatureCacheError

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
        bad = ~torch.isfinite(feats)
        if bad.any():
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


def forward_batches(
    encoder: FrozenEncoder,
    texts: Sequence[str],
    layers: list[int],
    device,
    token_budget: int | None,
    max_rows: int | None,
    sort_by_length: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(rows, fp32 CPU features `[B, len(layers), d]`) per batch of `token_batches` over `texts`."""
    tok = encoder.tokenizer
    ids = tok(list(texts), truncation=True, max_length=encoder.max_length)["input_ids"]
    depth = max(layers)
    pick = None if layers == list(range(depth + 1)) else torch.tensor(layers)
    encoder.to(device)
    with torch.inference_mode():
        for rows in token_batches([len(i) for i in ids], token_budget, max_rows, sort_by_length):
            batch = tok.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            feats = encoder(
                batch["input_ids"].to(device), batch["attention_mask"].to(device), depth=depth
            )
            if pick is not None:
                feats = feats.index_select(1, pick.to(feats.device))
            yield rows, feats.float().cpu()


def token_batches(
    lengths: Sequence[int],
    token_budget: int | None,
    max_rows: int | None = None,
    sort_by_length: bool = True,
) -> list[list[int]]:
    """Row indices in batches (longest rows first) whose padded size, rows x longest row, stays within
    `token_budget` and whose row count within `max_rows` (None: no bound). A row longer than the budget
    is a batch of its own."""
    order = (
        sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        if sort_by_length
        else range(len(lengths))
    )
    budget, cap = token_budget or math.inf, max_rows or math.inf
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        wider = max(width, lengths[i])
        if current and ((len(current) + 1) * wider > budget or len(current) >= cap):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        width = wider
    if current:
        batches.append(current)
    return batches


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
