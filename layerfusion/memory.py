"""Process memory: a resettable peak resident set size on Linux (`/proc`), and the peak memory of a
stage (CUDA memory on a GPU, RSS on the CPU). No Lightning import, so the memory benchmark's worker
processes can use it too."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated (GPU) or peak RSS of this process (CPU), in MB."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    hwm = proc_status_bytes("VmHWM")  # Linux: honours a reset by `reset_peak_memory`
    if hwm is not None:
        return hwm / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def reset_peak_memory() -> None:
    """Start a new peak: CUDA peak stats, and on Linux the process's peak RSS (`/proc/self/clear_refs`)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()  # not Linux: the peak stays the process's lifetime peak


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (`clear_refs` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def proc_status_bytes(field: str) -> int | None:
    """A kB field of `/proc/self/status` (e.g. `VmHWM`, `VmRSS`) in bytes; None where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
