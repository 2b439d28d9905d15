"""One job of tests/test_cache_sharing.py: waits at a file barrier with the other jobs, then loads or
builds the same cache entry; writes how many chunks it extracted (and its error, if any) as JSON.

Usage: python cache_job.py MODEL_DIR CACHE_DIR BARRIER_DIR JOBS OUT_JSON
Each chunk's extraction is slowed by 0.3 s so that the jobs overlap whatever the machine's load."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import layerfusion.features.cache as cache_mod
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder

TEXTS = [f"sentence number {i} " + "word " * (i % 7) for i in range(40)]
CHUNK_ROWS = 4


def main(model: str, cache: str, barrier: str, jobs: str, out: str) -> None:
    extracted, real = [], cache_mod.extract_chunk

    def slow_extract(*args, **kwargs):
        extracted.append(1)
        time.sleep(0.3)
        return real(*args, **kwargs)

    cache_mod.extract_chunk = slow_extract
    encoder = FrozenEncoder(EncoderSpec(model, max_length=16))
    Path(barrier, f"{Path(out).stem}.ready").touch()
    deadline = time.time() + 300
    while len(list(Path(barrier).glob("*.ready"))) < int(jobs) and time.time() < deadline:
        time.sleep(0.01)
    result: dict = {}
    try:
        feats = cache_mod.FeatureCache(cache, "float32", chunk_rows=CHUNK_ROWS).load_or_build(
            encoder, TEXTS, "train"
        )
        result["entry"] = str(feats.path)
    except Exception as err:  # reported to the test, which fails on it
        result["error"] = f"{type(err).__name__}: {err}"
    result["extracted"] = len(extracted)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
