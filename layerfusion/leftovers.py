"""Temporary files and directories of killed processes: named `<prefix><pid>-<token>`, removed once the
pid is dead.

The prefix names the owner's host (and, for `owner_tag`, its PID namespace), so only leftovers of this
host and namespace are judged by their pid; the part after the prefix must be exactly `<pid>-<token>`
(a token without hyphens), so a host named `node` never mistakes the leftovers of `node-7` (prefix
`...node-7-`) for its own.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
from pathlib import Path

_PID_TOKEN = re.compile(r"(\d+)-[^-]+")


def owner_tag() -> str:
    """This process's host and PID namespace (`host@ns<inode>`): pids are only comparable inside one namespace."""
    try:
        namespace = f"@ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: the host alone
        namespace = ""
    return f"{socket.gethostname()}{namespace}"


def remove_dead_leftovers(parent: Path, prefix: str) -> list[Path]:
    """Delete the entries of `parent` named `<prefix><pid>-<token>` whose process is gone; return them."""
    removed = []
    for leftover in parent.glob(f"{glob.escape(prefix)}*"):
        match = _PID_TOKEN.fullmatch(leftover.name[len(prefix) :])
        if match and not pid_alive(int(match.group(1))):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
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
