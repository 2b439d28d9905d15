"""Process memory on Linux (`/proc`): a resettable peak resident set size. No Lightning import, so the
memory benchmark's worker processes can use it too."""

from __future__ import annotations


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
