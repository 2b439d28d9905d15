"""Atomic file writes, temporary names, and the leftovers of killed processes.

Every temporary file or directory is named `<prefix><pid>-<token>` where the prefix ends in this process's
owner tag (`owner_tag`: host, boot and PID namespace), so a later process can tell which leftovers are its
host's and remove those whose pid is dead, and never touches those of a live process or of another host.
The part after the prefix must be exactly `<pid>-<token>` (a token without hyphens), so a host named
`node` never mistakes the leftovers of `node-7` (prefix `...node-7-`) for its own.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

_PID_TOKEN = re.compile(r"(\d+)-[^-]+")


def atomic_write(
    path: str | Path, data: bytes | str | Callable[[str], None], fsync: bool = False
) -> Path:
    """Write `data` (bytes, text, or a function that writes the temporary path it is given) to `path`
    through a temporary sibling and a rename: readers see the old file or the new one, never part of
    one; a failed write leaves the old file. `fsync=True` also makes the content and the name durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        if callable(data):
            data(str(tmp))
        else:
            with open(tmp, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    return atomic_write(path, text)


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically (indented; numpy/torch scalars as floats)."""
    return write_text(path, json.dumps(obj, indent=1, default=float))


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write rows of dicts as CSV atomically (columns from the first row)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_prefix(path: str | Path) -> str:
    """The name prefix of this host's temporary siblings of `path` (`.<name>.tmp-<owner>-`)."""
    return f".{Path(path).name}.tmp-{owner_tag()}-"


def temp_path(path: str | Path) -> Path:
    """A fresh temporary sibling of `path`, named so `remove_dead_leftovers` can clean it up."""
    path = Path(path)
    return path.with_name(f"{temp_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_temp_leftovers(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of `path` left by dead processes of this host; return them."""
    path = Path(path)
    return remove_dead_leftovers(path.parent, temp_prefix(path)) if path.parent.is_dir() else []


def fsync_dir(path: str | Path) -> None:
    """Make the names in directory `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def owner_tag() -> str:
    """This host boot and PID namespace (`host@<boot id>@ns<inode>`): pids are comparable only inside one.

    The boot id (Linux: /proc/sys/kernel/random/boot_id) tells apart two hosts with the same name on a
    shared filesystem, and one host before and after a reboot."""
    tag = socket.gethostname()
    try:
        tag += "@" + Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:  # not Linux: the host alone
        pass
    try:
        tag += f"@ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        pass
    return tag


def remove_dead_leftovers(parent: Path, prefix: str) -> list[Path]:
    """Delete the entries of `parent` named `<prefix><pid>-<token>` whose process is gone; return them."""
    removed = []
    for leftover in Path(parent).glob(f"{glob.escape(prefix)}*"):
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
