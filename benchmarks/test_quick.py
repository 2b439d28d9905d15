"""`benchmarks/run.py --quick` runs end to end, writes every figure, and what it computes holds: both
pipelines' features and probes agree, early exit keeps the kept layers exact, bf16 features stay within
cosine 0.999 of fp32, SDPA matches eager MPNet attention, selected-layer cache entries hold exactly the
all-layer entry's layers and token-budget batches stay within their budget."""

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
    "extraction_speedup",
    "extraction_cpu_ratio",
    "tap_overhead_ratio",
    "tap_memory_overhead",
    "hidden_states_memory_ratio",
    "early_exit_speedup",
    "bf16_extract_speedup",
    "mpnet_sdpa_speedup",
    "cached_epoch_speedup",
    "cached_fit_speedup",
    "reference_pipeline_speedup",
    "bucketing_speedup",
    "threads",
    "selected_layers_disk_ratio",
    "selected_layers_time_ratio",
    "token_budget_rss_ratio",
    "token_budget_sst2_time_ratio",
]
BENCHMARKS = {
    "hidden_states_memory",
    "tap_overhead",
    "bucketing",
    "early_exit",
    "bf16_extract",
    "mpnet_sdpa",
    "hidden_states_baseline",
    "cached_epoch",
    "reference_pipeline",
    "bf16_probe_parity",
    "scale",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # one thread: on a busy shared CPU, two intra-op threads make every small op wait for the
    # scheduler (about 4x slower here); this test checks code paths and numerics, not speed
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_benchmarks_write_every_figure(results: dict) -> None:
    for key in FIGURES:
        assert key in results, f"{key} missing from {sorted(results)}"
        assert _positive_finite(results[key]), f"{key} = {results[key]!r}"
    for group in ("bucketing_speedup_by_model", "bf16_extract_speedup_by_data"):
        assert results[group] and all(_positive_finite(v) for v in results[group].values())
    assert results["quick"] is True and results["targets_met"] is None and results["threads"] == 1
    assert isinstance(results["torch_version"], str)
    machine = results["machine"]
    assert {"platform", "cpu_count", "cpu_model", "cpu_flags", "cpu_bf16_units"} <= set(machine)
    assert set(results["raw"]) == BENCHMARKS


@pytest.mark.slow
def test_quick_benchmarks_compute_what_they_claim(results: dict) -> None:
    raw = results["raw"]
    # the paper-style reference and layerfusion probe the same features: equal to fp32 rounding,
    # and the same probes on them agree to one held-out row per layer
    pipeline = raw["reference_pipeline"]
    assert all(d < 1e-4 for d in pipeline["max_abs_feature_diff"].values()), pipeline
    held = pipeline["texts"] - int(0.8 * pipeline["texts"])
    acc = pipeline["probe_accuracy"]
    for model, layers in acc["layerfusion"].items():
        assert len(layers) == len(acc["reference"][model]) == 7  # MiniLM: embeddings + 6 blocks
        assert all(0 <= a <= 1 for a in layers)
        for a, b in zip(layers, acc["reference"][model], strict=True):
            assert abs(a - b) <= 1 / held + 1e-9, (model, layers, acc["reference"][model])
    # the headline baseline (one output_hidden_states pass per model) gets the same features
    baseline = raw["hidden_states_baseline"]
    assert all(d < 1e-5 for d in baseline["max_abs_feature_diff"].values()), baseline
    # early exit: layers 0..k of a pass stopped at k are exactly those of a full pass
    assert results["early_exit_max_abs_diff"] == 0.0
    assert raw["early_exit"]["exit_layer"] < raw["early_exit"]["layers"] - 1
    # bf16 really ran (features differ) and stays within cosine 0.999 of fp32 on every layer
    for dataset in ("sst2", "r8"):
        speed = raw["bf16_extract"][dataset]
        assert speed["max_abs_diff"] > 0, dataset
        assert min(speed["min_cosine_per_layer"]) >= 0.999, speed["min_cosine_per_layer"]
    parity = raw["bf16_probe_parity"]
    for dataset, by_model in parity["probe_accuracy"].items():
        dev = parity["rows"][dataset]["dev"]
        for model, acc in by_model.items():
            assert len(acc["float32"]) == len(acc["bfloat16"]) == 7
            assert min(parity["min_dev_cosine_per_layer"][dataset][model]) >= 0.999
            worst = max(abs(a - b) for a, b in zip(acc["float32"], acc["bfloat16"], strict=True))
            assert worst <= 2 / dev + 1e-9, (dataset, model, acc)  # at most two dev rows flip
    assert results["bf16_probe_max_diff_points"] >= 0
    # SDPA with the relative position bias as a float mask computes MPNet's eager attention
    assert results["mpnet_sdpa_max_abs_diff"] < 1e-4
    # a warm cache runs no encoder during training; online runs them every step (the speedups are
    # wall-clock ratios: reported, not asserted, since a shared machine's load can invert them)
    forwards = raw["cached_epoch"]["encoder_forwards"]
    assert forwards["cached"] == 0 and forwards["online"] > 0, forwards
    # a selected-layer entry (extracted with early exit) holds the all-layer entry's slice exactly,
    # in less space; every token-budget batch of the RSS runs fits its budget
    scale = raw["scale"]
    assert scale["selected_layers"]["max_abs_diff_vs_all_layer_slice"] == 0.0
    assert results["selected_layers_disk_ratio"] > 1
    runs = scale["peak_rss"]["runs"]
    assert f"budget_{scale['default_token_budget']}" in runs
    for name, run in runs.items():
        if name.startswith("budget_"):
            assert run["largest_batch"] <= int(name.removeprefix("budget_")), (name, run)


def _positive_finite(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
