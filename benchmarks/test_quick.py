"""`benchmarks/run.py --quick` runs end to end and writes every figure as a positive finite number."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).with_name("run.py")
FIGURES = [
    "tap_overhead_ratio",
    "hidden_states_memory_ratio",
    "cached_epoch_speedup",
    "reference_pipeline_speedup",
    "bucketing_speedup",
    "threads",
]


@pytest.mark.slow
def test_quick_benchmarks_write_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # one thread: on a busy shared CPU, two intra-op threads make every small op wait for the
    # scheduler (about 4x slower here); this test checks code paths, not figures
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for key in FIGURES:
        assert key in results, f"{key} missing from {sorted(results)}"
        assert _positive_finite(results[key]), f"{key} = {results[key]!r}"
    assert results["bucketing_speedup_by_model"]
    assert all(_positive_finite(v) for v in results["bucketing_speedup_by_model"].values())
    assert results["quick"] is True and results["targets_met"] is None and results["threads"] == 1
    assert isinstance(results["torch_version"], str)
    assert {"platform", "cpu_count", "processor"} <= set(results["machine"])
    assert set(results["raw"]) == {
        "hidden_states_memory",
        "tap_overhead",
        "bucketing",
        "cached_epoch",
        "reference_pipeline",
    }


def _positive_finite(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
