"""A failure on one rank stops every rank with that rank's message (2 Gloo processes, ddp_spawn)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_script

pytestmark = pytest.mark.slow

PROBE = """
import json, sys
from pathlib import Path

from lightning.fabric import Fabric

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.features import ranks
from layerfusion.features.cache import FeatureCache, FeatureCacheError


def run(fabric, model, out):
    encoder = FrozenEncoder(EncoderSpec(model, max_length=16))
    cache = FeatureCache(Path(out) / "cache", "float32", chunk_rows=2)
    texts = ["one row", "two rows", "three rows"]
    result = {}
    opened = ranks.open_entry  # every rank opens an entry through features.ranks
    if fabric.global_rank == 1:  # rank 1 cannot see the entry rank 0 published (NFS lookup cache)
        def not_visible(path):
            raise FeatureCacheError(f"injected: {path} has no manifest yet on rank 1")
        ranks.open_entry = not_visible
    for attempt in ("after build", "on a hit"):
        try:
            cache.load_or_build(encoder, texts, "train", dist=fabric)
            result[attempt] = None
        except FeatureCacheError as err:
            result[attempt] = str(err)
    ranks.open_entry = opened
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
    run_script(PROBE, tiny_models["bert"], str(tmp_path), tmp_path=tmp_path, timeout=240)
    for r in range(2):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        for attempt in ("after build", "on a hit"):
            message = result[attempt]
            assert message is not None, f"rank {r} went on {attempt}"
            assert "cannot be opened on rank 1" in message and "injected" in message, message


@pytest.mark.parametrize(
    ("stage", "point", "rank", "message"),
    [
        ("fit", "importance", 1, "injected failure on rank 1 at importance"),
        ("fit", "train", 1, "injected failure on rank 1 at train"),
        ("predict", "predict", 1, "injected failure on rank 1 at predict"),
        ("predict", "merge", 0, "rank 0 could not write"),
    ],
)
def test_a_failure_on_one_rank_ends_every_rank_with_its_message(
    tmp_path, tiny_models, sst2_slice, stage, point, rank, message
):
    """2 ranks of the CLI (Lightning's own launcher, Gloo): rank 1 fails as importance scoring starts, in
    a training step or in a predict step, or rank 0 cannot write the merged predictions (a full disk). The job ends at once, not after a collective
    timeout, and its output carries the failing rank's message."""
    import time

    import yaml
    from conftest import REPO, run_cli

    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["encoders"] = [{"name": tiny_models["bert"], "max_length": 16}]
    cfg["model"]["features"] = "online"
    cfg["model"]["cache_dir"] = str(
        tmp_path / "cache"
    )  # importance caches features: not the user's cache
    cfg["data"].update(dataset=str(sst2_slice), batch_size=16)
    cfg["trainer"].update(
        max_epochs=1, devices=2, strategy="ddp", default_root_dir=str(tmp_path / "run")
    )
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"] = [
        c for c in cfg["trainer"]["callbacks"] if "PredictionWriter" in c["class_path"]
    ] + [{"class_path": "ddp_probe.FailOnRank", "init_args": {"point": point, "rank": rank}}]
    if point == "importance":  # rank 0 scores (collectives) while rank 1 has failed
        cfg["trainer"]["callbacks"].append({"class_path": "layerfusion.callbacks.LayerImportance"})
    path = tmp_path / "fail.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tests = os.path.dirname(__file__)
    start = time.perf_counter()
    proc = run_cli(
        stage,
        "--config",
        str(path),
        cwd=tmp_path,
        check=False,
        env={"PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)},
    )
    seconds = time.perf_counter() - start
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert seconds < 240, (
        f"{seconds:.0f} s: a rank was left waiting"
    )  # the collective timeout is 30 min
    assert not (tmp_path / "run" / "predictions.jsonl").exists()
