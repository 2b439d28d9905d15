"""Shared pieces of the benchmarks: sizes, data slices, timing, machine facts."""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from layerfusion.encoders.frozen import cpu_bf16_units

REPO = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark runs; `FULL` is the measured mode, `QUICK` only keeps the code working."""

    quick: bool
    models: tuple[str, ...]
    """Encoders of the two-encoder benchmarks (cached epoch, pipelines, bucketing, bf16 probe parity)."""
    big: str
    """Encoder of the one-encoder benchmarks (tap overhead, memory, bf16 speed, early exit)."""
    batch_size: int
    """Extraction / forward batch size."""
    max_length: int
    """Token limit of the SST-2 benchmarks."""
    tap_texts: int
    tap_rounds: int
    memory_batch: int
    memory_length: int
    memory_rounds: int
    epoch_texts: int
    epoch_batch_size: int
    """Head-training batch size (the quickstart's 64)."""
    epoch_rounds: int
    pipeline_texts: int
    probe_epochs: int
    bucket_texts: dict[str, int]
    bucket_rounds: int
    baseline_texts: int
    """SST-2 sentences of the headline comparison with one `output_hidden_states` pass per model."""
    baseline_rounds: int
    precision_texts: dict[str, int]
    """Texts per dataset (`sst2` sentences, `r8` documents) of the bf16 vs fp32 extraction speed."""
    precision_lengths: dict[str, int]
    """Token limit per dataset of the bf16 speed and probe-parity benchmarks."""
    precision_rounds: int
    parity_rows: dict[str, tuple[int, int]]
    """(train, dev) rows per dataset of the bf16 vs fp32 per-layer probe accuracies."""
    exit_depth: int
    """Deepest layer of the early-exit benchmark (of the `big` encoder's layers)."""
    exit_texts: int
    exit_rounds: int
    sdpa_model: str | None
    """Real MPNet for the SDPA measurement; None = a tiny random MPNet (quick mode: code paths only)."""


FULL = Sizes(
    quick=False,
    models=(MINILM, MPNET),
    big=MPNET,
    batch_size=32,
    max_length=128,
    tap_texts=96,
    tap_rounds=9,
    memory_batch=32,
    memory_length=512,
    memory_rounds=2,
    epoch_texts=1000,
    epoch_batch_size=64,
    epoch_rounds=4,
    pipeline_texts=500,
    probe_epochs=5,
    bucket_texts={MINILM: 256, MPNET: 128},
    bucket_rounds=2,
    baseline_texts=256,
    baseline_rounds=4,
    precision_texts={"sst2": 128, "r8": 64},
    precision_lengths={"sst2": 128, "r8": 256},
    precision_rounds=4,
    parity_rows={"sst2": (800, 872), "r8": (800, 400)},
    exit_depth=8,
    exit_texts=128,
    exit_rounds=4,
    sdpa_model=MPNET,
)
QUICK = Sizes(
    quick=True,
    models=(MINILM,),
    big=MINILM,
    batch_size=8,
    max_length=128,
    tap_texts=16,
    tap_rounds=2,
    memory_batch=4,
    memory_length=64,
    memory_rounds=1,
    epoch_texts=32,
    epoch_batch_size=8,
    epoch_rounds=2,
    pipeline_texts=32,
    probe_epochs=2,
    bucket_texts={MINILM: 32},
    bucket_rounds=1,
    baseline_texts=16,
    baseline_rounds=2,
    precision_texts={"sst2": 4, "r8": 2},
    precision_lengths={"sst2": 32, "r8": 64},
    precision_rounds=2,
    parity_rows={"sst2": (32, 16)},
    exit_depth=4,
    exit_texts=16,
    exit_rounds=2,
    sdpa_model=None,
)


def data_dir() -> Path:
    """The real datasets: $LAYERFUSION_DATA, else ../shared/data next to the repository."""
    return Path(os.environ.get("LAYERFUSION_DATA", REPO.parent / "shared" / "data"))


def sst2_slice(n: int, seed: int) -> tuple[list[str], list[int]]:
    """A seeded random slice of `n` SST-2 training sentences (in random order) and their class ids."""
    from layerfusion.data.readers import read_jsonl

    ex = read_jsonl(data_dir() / "sst2" / "train.jsonl")
    rows = random.Random(seed).sample(range(len(ex)), n)
    names = sorted(set(ex.labels))
    return [ex.texts[i] for i in rows], [names.index(ex.labels[i]) for i in rows]


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, reversing the order on odd rounds; each returns its seconds."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(variants[name]())
    return times


def round_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-round ratios of two variants measured side by side."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def median(values: list[float]) -> float:
    """The median of `values`."""
    return float(statistics.median(values))


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds `fn()` takes (waiting for the GPU when there is one)."""
    return clocked(fn, device)[1]


def clocked(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """`fn()`'s result and the seconds it took (waiting for the GPU when there is one)."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def sync(device: str) -> None:
    """Wait for queued GPU work."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def machine_info() -> dict:
    """Platform, CPU count and processor of this machine."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_bf16_units": cpu_bf16_units(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def log(message: str) -> None:
    """Progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _cpu_flags() -> list[str]:
    """The CPU feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    return (_cpuinfo("flags") or "").split()


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.machine()


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
