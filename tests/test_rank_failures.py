"""A failure on one rank stops every rank with that rank's message (2 Gloo processes, ddp_spawn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import json, sys
from pathlib import Path

from lightning.fabric import Fabric

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features import cache as cache_mod
from layerfusion.features.cache import FeatureCache, FeatureCacheError


def run(fabric, model, out):
    encoder = FrozenEncoder(EncoderSpec(model, max_length=16))
    cache = FeatureCache(Path(out) / "cache", "float32", chunk_rows=2)
    texts = ["one row", "two rows", "three rows"]
    result = {}
    opened = cache_mod.open_entry
    if fabric.global_rank == 1:  # rank 1 cannot see the entry rank 0 published (NFS lookup cache)
        def not_visible(path):
            raise FeatureCacheError(f"injected: {path} has no manifest yet on rank 1")
        cache_mod.open_entry = not_visible
    for attempt in ("after build", "on a hit"):
        try:
            cache.load_or_build(encoder, texts, "train", dist=fabric)
            result[attempt] = None
        except FeatureCacheError as err:
            result[attempt] = str(err)
    cache_mod.open_entry = opened
    fabric.barrier()  # both ranks got here: nobody was left waiting in a collective
    (Path(out) / f"rank{fabric.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(run, sys.argv[1], sys.argv[2])
"""


def test_an_entry_rank_1_cannot_open_stops_both_ranks_with_its_message(tmp_path, tiny_models):
    """Opening a cache entry fails on rank 1 only, after the build and on a later hit: both ranks
    raise, naming rank 1 and its error, instead of rank 0 training on into a collective that rank 1
    never joins (a 30-minute NCCL timeout)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run(
        [sys.executable, str(script), tiny_models["bert"], str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(2):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        for attempt in ("after build", "on a hit"):
            message = result[attempt]
            assert message is not None, f"rank {r} went on {attempt}"
            assert "cannot be opened on rank 1" in message and "injected" in message, message
