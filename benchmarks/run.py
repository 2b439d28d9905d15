"""Run every layerfusion benchmark and write its figures to a JSON file.

Usage: python benchmarks/run.py [--quick] [--out benchmarks/results.json] [--threads 2] [--device cpu]
                                [--only NAME,NAME]

Every figure is a ratio of two variants measured side by side in this one run (alternated,
repeated, median; see benchmarks/README.md for which figures are single runs), so other load on the
machine cancels out as far as possible.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from benchutil import FULL, QUICK, log, machine_info  # noqa: E402

TARGETS: dict[str, tuple[str, float]] = {
    "tap_overhead_ratio": (">=", 0.95),
    "tap_memory_overhead": ("<=", 1.02),
    "early_exit_speedup": (">=", 1.3),
    "bf16_extract_speedup": (">=", 1.8),
    "bf16_probe_max_diff_points": ("<=", 0.5),
    "cached_epoch_speedup": (">=", 50.0),
    "reference_pipeline_speedup": (">=", 5.0),
}
"""Targets of the full mode (quick mode only keeps the code working)."""

REPORTED = [
    "extraction_speedup",
    "extraction_cpu_ratio",
    *TARGETS,
    "hidden_states_memory_ratio",
    "cached_fit_speedup",
    "bucketing_speedup",
    "early_exit_max_abs_diff",
    "mpnet_sdpa_speedup",
    "mpnet_sdpa_max_abs_diff",
    "selected_layers_disk_ratio",
    "selected_layers_time_ratio",
    "token_budget_rss_ratio",
    "token_budget_sst2_time_ratio",
]
"""Figures printed in the summary, in this order."""


def main(argv: list[str] | None = None) -> dict:
    """Run all benchmarks, write the JSON to `--out`, print a summary; return the results."""
    args = parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    results: dict = {
        "quick": sizes.quick,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": machine_info(),
        "raw": {},
    }
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        chosen = benchmarks(sizes, device, args.threads, Path(tmp))
        only = [n for n in (args.only or "").split(",") if n]
        unknown = sorted(set(only) - set(chosen))
        if unknown:
            raise SystemExit(f"--only: unknown benchmarks {unknown}; choose from {list(chosen)}")
        for name, bench in chosen.items():
            if only and name not in only:
                continue
            log(f"{name}: start")
            begin, load = time.perf_counter(), os.getloadavg()[0]
            figures = bench()
            raw = figures.pop("raw")
            raw["wall_seconds"] = time.perf_counter() - begin
            raw["load_average_1min"] = {"start": load, "end": os.getloadavg()[0]}
            results.update(figures)
            results["raw"][name] = raw
            log(f"{name}: {figures} in {raw['wall_seconds']:.0f}s")
    results["wall_seconds"] = time.perf_counter() - started
    results["targets"] = {key: f"{op} {value:g}" for key, (op, value) in TARGETS.items()}
    results["targets_met"] = None if sizes.quick else targets_met(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print_summary(results, args.out)
    return results


def benchmarks(sizes, device: str, threads: int, workdir: Path) -> dict[str, Callable[[], dict]]:
    """The benchmarks in run order; memory first, while this process holds no model."""
    from baseline import bench_hidden_states_baseline
    from bucketing import bench_bucketing
    from cached_epoch import bench_cached_epoch
    from early_exit import bench_early_exit
    from feature_pipeline import bench_reference_pipeline
    from memory import bench_hidden_states_memory
    from mpnet_sdpa import bench_mpnet_sdpa
    from precision import bench_bf16_extract, bench_bf16_probe_parity
    from scale import bench_scale
    from tap_overhead import bench_tap_overhead

    return {
        "hidden_states_memory": lambda: bench_hidden_states_memory(sizes, device, threads),
        "tap_overhead": lambda: bench_tap_overhead(sizes, device),
        "bucketing": lambda: bench_bucketing(sizes, device),
        "early_exit": lambda: bench_early_exit(sizes, device),
        "bf16_extract": lambda: bench_bf16_extract(sizes, device),
        "mpnet_sdpa": lambda: bench_mpnet_sdpa(sizes, device),
        "hidden_states_baseline": lambda: bench_hidden_states_baseline(
            sizes, device, workdir / "baseline"
        ),
        "cached_epoch": lambda: bench_cached_epoch(sizes, device, workdir / "epoch"),
        "reference_pipeline": lambda: bench_reference_pipeline(sizes, device, workdir / "pipeline"),
        "bf16_probe_parity": lambda: bench_bf16_probe_parity(sizes, device),
        "scale": lambda: bench_scale(sizes, device, threads, workdir / "scale"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, MiniLM only (for CI)")
    parser.add_argument("--out", default="benchmarks/results.json", help="where to write the JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names to run")
    return parser.parse_args(argv)


def targets_met(results: dict) -> dict[str, bool | None]:
    """Whether each full-mode figure reaches its target (None: not measured, or not applicable here)."""
    met: dict[str, bool | None] = {}
    for key, (op, value) in TARGETS.items():
        figure = results.get(key)
        if figure is None or (key == "bf16_extract_speedup" and not _bf16_hardware(results)):
            met[key] = None  # the bf16 speed target is for hardware with bf16 units
            continue
        met[key] = bool(
            math.isfinite(figure) and (figure >= value if op == ">=" else figure <= value)
        )
    return met


def _bf16_hardware(results: dict) -> bool:
    """Whether the benchmark ran on a device with bf16 units (a CUDA card, or a CPU torch reports them on)."""
    return results["device"].startswith("cuda") or bool(results["machine"].get("cpu_bf16_units"))


def print_summary(results: dict, out: str) -> None:
    """One line per figure on stdout."""
    for key in REPORTED:
        if key not in results:
            continue
        op, value = TARGETS.get(key, ("", float("nan")))
        target = f"(target {op} {value:g})" if op else ""
        print(f"{key:30s} {results[key]:10.4g} {target}")
    for group in ("bucketing_speedup_by_model", "bf16_extract_speedup_by_data"):
        for name, figure in results.get(group, {}).items():
            print(f"  {group.split('_by_')[0]} {name:19s} {figure:10.3f}")
    print(
        f"wall time {results['wall_seconds']:.0f}s, {results['threads']} threads, {results['device']}"
    )
    print(f"written to {out}")


def quiet_libraries() -> None:
    """Keep Lightning's and transformers' banners and progress bars out of the benchmark output."""
    import lightning  # noqa: F401  (configures its loggers on import: import first, then quiet them)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "layerfusion"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


if __name__ == "__main__":
    main(sys.argv[1:])
