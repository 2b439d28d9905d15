"""scripts/selection_cost.py: which alternative selections it trains, and which committed rows it
compares them with (the training itself is `reproduce.run_one`, tested in test_reproduce)."""

from __future__ import annotations

import importlib.util

import numpy as np
from conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location(
        "selection_cost", REPO / "scripts" / "selection_cost.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample(seed: int, mini: list[int], mp: list[int], short: tuple[float, float]) -> dict:
    return {
        "seed": seed,
        "selection": {"mini": mini, "mp": mp},
        "probe_acc_shortfall": {"mini": short[0], "mp": short[1]},
    }


STABILITY = {
    "full": {"selection": {"mini": [2, 3, 5], "mp": [7, 9, 11]}},
    "samples": [
        _sample(0, [0, 5, 6], [8, 10, 12], (0.0103, 0.0056)),
        _sample(1, [3, 2, 5], [11, 9, 7], (0.0, 0.0)),  # the full-data selection, in another order
        _sample(2, [3, 4, 5], [8, 10, 12], (0.0005, 0.0056)),
        _sample(3, [3, 4, 5], [8, 10, 12], (0.0005, 0.0056)),  # the same as seed 2
        _sample(4, [0, 5, 6], [5, 8, 9], (0.0103, 0.0089)),
    ],
}


def test_worst_is_the_largest_summed_probe_shortfall_and_all_are_the_distinct_others():
    script = _script()
    (worst,) = script.alternatives(STABILITY, "worst")
    assert worst["seeds"] == [4]
    assert worst["selection"] == {"mini": [0, 5, 6], "mp": [5, 8, 9]}
    every = script.alternatives(STABILITY, "all")
    assert [a["seeds"] for a in every] == [[4], [0], [2, 3]]
    assert every[2]["source"] == "sample seed 2, 3"
    other = {
        **STABILITY,
        "other_dtype": {
            "dtype": "float32",
            "selection": {"mini": [5, 4, 3], "mp": [7, 8, 9]},
            "probe_acc_shortfall": {"mini": 0.0005, "mp": 0.0047},
        },
    }
    (fp32,) = script.alternatives(other, "other-dtype")
    assert fp32["source"] == "float32 features"
    assert fp32["selection"] == {"mini": [3, 4, 5], "mp": [7, 8, 9]}


def test_the_reference_is_the_full_data_gated_rows_only():
    script = _script()
    gold = np.array([0, 1, 1, 0], np.int16)
    runs = [
        {"train_rows": "", "method": "gated", "seed": 0},
        {"train_rows": "50", "method": "gated", "seed": 0},  # the low-data arm: not the reference
        {"train_rows": "", "method": "selected", "seed": 0},
        {"train_rows": "", "method": "gated", "seed": 1},
    ]
    pred = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]], np.int16)
    correct, seeds = script.committed_gated({"runs": runs, "pred_test": pred, "gold_test": gold})
    assert seeds == [0, 1]
    assert correct.tolist() == [[True, True, True, False], [True, True, True, True]]
