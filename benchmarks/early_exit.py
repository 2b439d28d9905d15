"""Extraction of layers 0..k only (the encoder stops after layer k) vs extraction of every layer."""

from __future__ import annotations

from functools import partial

import numpy as np
from benchutil import Sizes, alternate, log, median, round_ratios, sst2_slice, timed

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features.cache import extract


def bench_early_exit(sizes: Sizes, device: str) -> dict:
    """`early_exit_speedup` = all-layer extraction time / extraction time up to layer `exit_depth`."""
    encoder = FrozenEncoder(EncoderSpec(sizes.big, max_length=sizes.max_length)).to(device)
    texts, _ = sst2_slice(sizes.exit_texts, seed=5)
    n, width = len(texts), encoder.hidden_size
    outs = {
        "all": np.empty((n, encoder.num_layers, width), np.float32),
        "exit": np.empty((n, sizes.exit_depth + 1, width), np.float32),
    }

    def run(variant: str, rows: int = n) -> float:
        out = outs[variant][:rows]
        return timed(lambda: extract(encoder, texts[:rows], out, sizes.batch_size, device), device)

    for variant in outs:  # warm-up
        run(variant, rows=min(n, sizes.batch_size))
    times = alternate({v: partial(run, v) for v in outs}, sizes.exit_rounds)
    ratios = round_ratios(times["all"], times["exit"])
    diff = float(np.abs(outs["all"][:, : sizes.exit_depth + 1] - outs["exit"]).max())
    log(f"early exit at layer {sizes.exit_depth}: x{median(ratios):.2f}, max diff {diff:g}")
    encoder.close()
    return {
        "early_exit_speedup": median(ratios),
        "early_exit_max_abs_diff": diff,
        "raw": {
            "model": sizes.big,
            "layers": encoder.num_layers,
            "exit_layer": sizes.exit_depth,
            "texts": n,
            "batch_size": sizes.batch_size,
            "compute_dtype": encoder.compute_precision(device),
            "seconds": times,
            "round_ratios": ratios,
        },
    }
