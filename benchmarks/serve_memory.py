"""Where `layerfusion serve`'s memory growth comes from: the encoder's per-shape caches, in-process.

    python benchmarks/serve_memory.py [--batches 200] [--out benchmarks/serve_memory.json]

One process per variant, on the CPU with one torch thread: all-MiniLM-L6-v2 (the classifier of
`benchmarks/serve.py`) runs `--batches` forward passes of random shapes (1..16 texts of 5..60 tokens,
seeded), then the same shapes again; RSS after every 50 passes. Variants: the encoder in bf16 autocast
(what `compute_dtype: auto` picks on an AVX512-BF16 CPU), the same with oneDNN's primitive cache off
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`), in fp32; and bf16 and fp32 with the server's `ShapeBuckets`
(each pass padded to a bucket shape, every bucket run once first: growth counted from after that
warm-up). Growth that stops on the second pass is a cache keyed by shape (bounded by the shapes a
server sees), not a leak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from benchutil import MINILM, REPO, log, machine_info

VARIANTS = {
    "bfloat16": ("bfloat16", {}),
    "bfloat16_onednn_cache_0": ("bfloat16", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}),
    "float32": ("float32", {}),
    "bfloat16_shape_buckets": ("bfloat16", {}),
    "float32_shape_buckets": ("float32", {}),
}


def main() -> None:
    """Run every variant in a fresh process and write the RSS series."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument(
        "--variant", help=argparse.SUPPRESS
    )  # internal: one variant, in this process
    parser.add_argument("--only", help="comma-separated variants (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "serve_memory.json"))
    args = parser.parse_args()
    if args.variant:
        dtype = VARIANTS[args.variant][0]
        print(json.dumps(run(dtype, args.batches, args.variant.endswith("_shape_buckets"))))
        return
    results = {"machine": machine_info(), "batches": args.batches, "variants": {}}
    results["machine"]["load_average_at_start"] = os.getloadavg()
    names = args.only.split(",") if args.only else list(VARIANTS)
    for name in names:
        env = VARIANTS[name][1]
        cmd = [sys.executable, __file__, "--variant", name, "--batches", str(args.batches)]
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        results["variants"][name] = json.loads(out.stdout.splitlines()[-1])
        log(f"{name}: {results['variants'][name]}")
    results["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def run(compute_dtype: str, batches: int, buckets: bool) -> dict:
    """RSS (MiB) after loading (and with `buckets`, after `ShapeBuckets.warm_up`), then every 50 passes
    over the shapes, twice."""
    import torch

    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.encoders.offline import no_loading_bars, resolve_model
    from layerfusion.serve_shapes import ShapeBuckets

    torch.set_num_threads(1)
    with no_loading_bars():
        encoder = FrozenEncoder(EncoderSpec(resolve_model(MINILM), compute_dtype=compute_dtype))
    rss = {"loaded": _rss_mib()}
    start = time.perf_counter()
    warm_up = {}
    if buckets:
        shapes = ShapeBuckets(encoder, max_rows=16).warm_up(depth=6, device="cpu")
        rss["warmed_up"] = _rss_mib()
        warm_up = {
            "warm_up_shapes": shapes,
            "warm_up_seconds": round(time.perf_counter() - start, 1),
        }
    for rep in ("first", "second"):
        rng, series = random.Random(0), []
        for i in range(batches):
            n, length = rng.randint(1, 16), rng.randint(5, 60)
            ids = torch.randint(1000, 2000, (n, length))
            encoder(ids, torch.ones(n, length, dtype=torch.long), depth=6)
            if i % 50 == 49:
                series.append(_rss_mib())
        rss[f"{rep}_pass"] = series
    return {
        "rss_mib": rss,
        "growth_first_pass_mib": rss["first_pass"][-1] - rss.get("warmed_up", rss["loaded"]),
        "growth_second_pass_mib": rss["second_pass"][-1] - rss["first_pass"][-1],
        "seconds": round(time.perf_counter() - start, 1),
        "precision": encoder.compute_precision("cpu"),
        **warm_up,
    }


def _rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


if __name__ == "__main__":
    main()
