"""Extraction throughput with length-sorted batches vs batches in the given (random) order."""

from __future__ import annotations

from functools import partial

import numpy as np
from benchutil import MPNET, Sizes, alternate, log, median, round_ratios, sst2_slice, timed

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features.cache import extract


def bench_bucketing(sizes: Sizes, device: str) -> dict:
    """`bucketing_speedup` = sorted throughput / unsorted throughput; the MPNet figure (the largest model run)."""
    by_model, raw = {}, {}
    for name in sizes.bucket_texts:
        encoder = FrozenEncoder(EncoderSpec(name, max_length=sizes.max_length)).to(device)
        texts, _ = sst2_slice(sizes.bucket_texts[name], seed=3)
        out = np.empty((len(texts), encoder.num_layers, encoder.hidden_size), np.float32)

        run = partial(extraction_seconds, encoder, texts, out, sizes.batch_size, device)
        run(True, rows=sizes.batch_size)  # warm-up
        times = alternate(
            {"sorted": partial(run, True), "unsorted": partial(run, False)}, sizes.bucket_rounds
        )
        ratios = round_ratios(times["unsorted"], times["sorted"])  # throughput = inverse time
        by_model[encoder.spec.key] = median(ratios)
        raw[encoder.spec.key] = {
            "texts": len(texts),
            "batch_size": sizes.batch_size,
            "seconds": times,
            "round_ratios": ratios,
        }
        log(f"bucketing {encoder.spec.key}: x{by_model[encoder.spec.key]:.2f} ({times})")
        encoder.close()
    headline = EncoderSpec(MPNET).key if EncoderSpec(MPNET).key in by_model else list(by_model)[-1]
    return {
        "bucketing_speedup": by_model[headline],
        "bucketing_speedup_by_model": by_model,
        "raw": {"headline_model": headline, **raw},
    }


def extraction_seconds(
    encoder: FrozenEncoder,
    texts: list[str],
    out: np.ndarray,
    batch_size: int,
    device: str,
    sort: bool,
    rows: int | None = None,
) -> float:
    """Seconds of `extract` over the first `rows` texts (all by default), sorted by length or not."""
    rows = len(texts) if rows is None else rows
    return timed(
        lambda: extract(encoder, texts[:rows], out[:rows], batch_size, device, sort_by_length=sort),
        device,
    )
