"""Temporary directories of killed processes: named `<prefix><pid>-...`, removed once the pid is dead."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def remove_dead_leftovers(parent: Path, prefix: str) -> list[Path]:
    """Delete the entries of `parent` named `<prefix><pid>-...` whose process is gone; return them."""
    removed = []
    for leftover in parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
