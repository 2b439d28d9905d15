"""File locks through which jobs (and DDP ranks) sharing a cache_dir cooperate on one entry."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class EntryLock:
    """Cooperation of the jobs building one entry, through POSIX record locks on `.<entry>.lock` beside
    it (the operating system releases them when a process dies; NFS through its lock manager): byte 0
    is held while a job finishes, reclaims or cleans the entry; byte 1 + i while a job extracts chunk i;
    byte `_PRESENCE + chunk_rows`, shared, by every job building in that layout. The file is removed once
    the entry is complete. Without lock support
    (a warning once) builds still work but may extract a chunk twice."""

    _PRESENCE = 1 << 40
    _warned = False

    def __init__(self, path: Path) -> None:
        self.file = path.with_name(f".{path.name}.lock")
        try:
            self.fd: int | None = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            self._unsupported(err)
            self.fd = None

    def claim(self, index: int, block: bool = False) -> bool:
        """Claim chunk `index` (False when another job holds it and `block` is False)."""
        return self._lock(1 + index, fcntl.LOCK_EX, block)

    def release(self, index: int) -> None:
        """Release the claim on chunk `index`."""
        self._unlock(1 + index)

    @contextmanager
    def finishing(self) -> Iterator[None]:
        """Hold the entry's finish lock (waits for another job finishing it)."""
        self._lock(0, fcntl.LOCK_EX, True)
        try:
            yield
        finally:
            self._unlock(0)

    def building(self, chunk_rows: int) -> None:
        """Say (until `close`) that this process builds in chunks of `chunk_rows` rows."""
        self._lock(self._PRESENCE + chunk_rows, fcntl.LOCK_SH, True)

    def layout_in_use(self, chunk_rows: int) -> bool:
        """Whether a live job (another process) builds in chunks of `chunk_rows` rows."""
        if self.fd is None:
            return True
        if not self._lock(self._PRESENCE + chunk_rows, fcntl.LOCK_EX, False):
            return True
        self._unlock(self._PRESENCE + chunk_rows)
        return False

    def discard(self) -> None:
        """Remove the lock file (call holding the finish lock, once the entry is complete: a job that
        still waits on the old file then finds the entry complete; nothing is built any more)."""
        self.file.unlink(missing_ok=True)

    def close(self) -> None:
        """Release every lock of this process on the entry."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _lock(self, offset: int, mode: int, block: bool) -> bool:
        if self.fd is None:
            return True
        try:
            fcntl.lockf(self.fd, mode if block else mode | fcntl.LOCK_NB, 1, offset)
            return True
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            self._unsupported(err)
            return True

    def _unlock(self, offset: int) -> None:
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)
            except OSError:
                pass

    def _unsupported(self, err: OSError) -> None:
        if not EntryLock._warned:
            EntryLock._warned = True
            log.warning(
                "feature cache: no file locks at %s (%s): jobs sharing this cache_dir may extract a "
                "chunk twice; use a filesystem with locks (local disk, NFS with its lock manager)",
                self.file.parent,
                err,
            )
