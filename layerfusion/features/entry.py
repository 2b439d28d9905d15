"""One cache entry on disk: its manifest, its checksummed chunk files, the build directory they are
written to, and `CachedFeatures`, the memory-mapped reader."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from layerfusion.errors import LayerFusionError
from layerfusion.files import atomic_write, file_sha256, fsync_dir, owner_tag

log = logging.getLogger(__name__)


class FeatureCacheError(LayerFusionError, RuntimeError):
    """A feature cache entry cannot be built or read: the message names the entry, split or row."""


class CachedFeatures:
    """A cache entry read through memory maps: `feats[rows]` is a tensor `[B, len(layers), d]` in the
    entry's dtype, for rows given as a LongTensor, list, slice, int or bool mask (as for a tensor:
    repeated rows are repeated); `feats[rows, ...]` indexes further
    like a tensor (layers by position). `layers` are the absolute layer indices held, `select` narrows
    them. Each chunk's SHA-256 is checked the first time this process reads it."""

    def __init__(self, path: Path, manifest: dict, layers: list[int] | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._stored = list(manifest["layers"])
        self.layers = list(self._stored if layers is None else layers)
        missing = sorted(set(self.layers) - set(self._stored))
        if missing:
            raise FeatureCacheError(f"{path} holds layers {self._stored}, not {missing}")
        self._cols = (
            None if self.layers == self._stored else [self._stored.index(i) for i in self.layers]
        )
        rows, _, dim = manifest["shape"]
        self.shape = torch.Size((rows, len(self.layers), dim))
        self.dtype = getattr(torch, manifest["dtype"])
        self._np_dtype = np.dtype(manifest["dtype"])
        self._chunk_rows = int(manifest["chunk_rows"])
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"CachedFeatures({self.path}, shape={tuple(self.shape)}, layers={self.layers})"

    def select(self, layers: Sequence[int]) -> CachedFeatures:
        """A view holding only `layers` (absolute indices, each held here)."""
        view = CachedFeatures(self.path, self.manifest, sorted(layers))
        view._arrays = self._arrays  # one set of memory maps
        return view

    def to(self, *args, **kwargs) -> torch.Tensor:
        """Every row as a tensor, then `Tensor.to(*args, **kwargs)`."""
        return self[:].to(*args, **kwargs)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, tuple):
            rows, rest = index[0], index[1:]
            out = self[rows]
            return out[rest] if isinstance(rows, int) else out[(slice(None), *rest)]
        if isinstance(index, torch.Tensor) and index.ndim == 0 or isinstance(index, np.integer):
            index = int(index)
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"row {index} out of range for {len(self)} rows")
            return self._rows(np.array([index % len(self)]))[0]
        if isinstance(index, slice):
            return self._rows(np.arange(len(self))[index])
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        if idx.dtype == np.bool_:  # a mask, as for a tensor
            if idx.shape != (len(self),):
                raise IndexError(f"a row mask needs shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size and idx.dtype.kind not in "iu":
            raise IndexError(f"rows must be integers or a bool mask, got {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.ndim != 1:
            raise IndexError(f"rows must be one-dimensional, got shape {idx.shape}")
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        return self._rows(idx % max(len(self), 1))

    def _rows(self, idx: np.ndarray) -> torch.Tensor:
        """Rows `idx` (non-negative), gathered chunk by chunk."""
        out = np.empty((len(idx), *self.shape[1:]), dtype=self._np_dtype)
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        chunk = ordered // self._chunk_rows
        bounds = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), len(idx)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            if start == end:
                continue
            c = int(chunk[start])
            local = ordered[start:end] - c * self._chunk_rows
            array = self._chunk(c)
            if local[-1] - local[0] == end - start - 1 and (np.diff(local) == 1).all():
                # sorted, consecutive and distinct: one slice
                block = array[local[0] : local[-1] + 1]
            else:
                block = array[local]
            out[order[start:end]] = block if self._cols is None else block[:, self._cols]
        return torch.from_numpy(out)

    def _chunk(self, c: int) -> np.ndarray:
        """Chunk `c`, memory-mapped; its checksum verified on the first read in this process."""
        if c not in self._arrays:
            meta = self.manifest["chunks"][c]
            f = self.path / meta["file"]
            if (str(f), meta["sha256"]) not in _VERIFIED:
                try:
                    actual = file_sha256(f)
                except OSError as err:
                    raise FeatureCacheError(
                        f"feature cache chunk {f} cannot be read ({err}); run again to re-extract it"
                    ) from None
                if actual != meta["sha256"]:
                    f.unlink(missing_ok=True)
                    raise FeatureCacheError(
                        f"feature cache chunk {f} fails its SHA-256 check (changed on disk since it was "
                        "written): it was removed; run again to re-extract that chunk"
                    )
                _VERIFIED.add((str(f), meta["sha256"]))
            self._arrays[c] = np.load(f, mmap_mode="r", allow_pickle=False)
        return self._arrays[c]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # memory maps are reopened where unpickled


_VERIFIED: set[tuple[str, str]] = set()
"""Chunk files (path, SHA-256) whose checksum this process has verified."""


def open_entry(path: Path) -> CachedFeatures:
    """The entry at `path` (checked cheaply: manifest readable, chunk files of their recorded size)."""
    problem = verify(path)
    if problem is not None:
        raise FeatureCacheError(f"feature cache entry {path} is unusable: {problem}")
    return CachedFeatures(path, read_manifest(path))


def verify(path: Path, key: dict | None = None) -> str | None:
    """None when the entry at `path` is complete (and was built from `key`, if given); else what is wrong.

    Cheap: reads the manifest and the chunk files' sizes, not their contents."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "incomplete: no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"manifest is not valid JSON ({err})"
    if key is not None and manifest.get("key") != key:
        return "built from other inputs (key mismatch)"
    try:
        chunks, rows = manifest["chunks"], manifest["shape"][0]
        if sum(c["rows"] for c in chunks) != rows:
            return f"chunks hold {sum(c['rows'] for c in chunks)} rows, the manifest says {rows}"
        for c in chunks:
            f = path / c["file"]
            if not f.is_file():
                return f"chunk {c['file']} is missing"
            if f.stat().st_size != c["bytes"]:
                return (
                    f"chunk {c['file']} is {f.stat().st_size} bytes, the manifest says {c['bytes']}"
                )
    except (KeyError, TypeError, IndexError) as err:
        return f"manifest lacks {err}"
    return None


def read_manifest(path: Path) -> dict:
    """The manifest of the entry at `path` ({} when missing or unreadable)."""
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def write_chunk(build: Path, index: int, array: np.ndarray) -> Path | None:
    """Publish chunk `index` as `<index>.<sha256>.npy` in `build`: written to a temporary name (hashed as
    written, fsynced) and renamed (call it holding the chunk's claim, so no job finishes the entry while
    the temporary file exists). None when the build directory is gone (another job finished the entry)."""
    free = _free_bytes(build)
    if free is not None and free < array.nbytes + 4096:
        raise FeatureCacheError(
            f"not enough disk space for feature cache chunk {index} ({array.nbytes / 2**20:,.1f} MiB as "
            f"{array.dtype}) in {build}: {free / 2**20:,.1f} MiB free; free space or set "
            "model.cache_dir elsewhere (the chunks written so far are kept and resumed)"
        )
    tmp = build / f"{tmp_prefix()}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            np.save(writer, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        final = build / f"{index:06d}.{writer.sha.hexdigest()}.npy"
        os.replace(
            tmp, final
        )  # a file of that name has these very bytes: replacing it changes nothing
        return final
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise FeatureCacheError(
                f"disk full while writing feature cache chunk {index} to {build}: free space or set "
                "model.cache_dir elsewhere (the chunks written so far are kept and resumed)"
            ) from None
        if not build.is_dir():
            return None  # another job renamed the build into place: nothing to add
        raise
    finally:
        tmp.unlink(missing_ok=True)


def list_chunks(build: Path) -> dict[int, list[str]]:
    """The chunk files in `build` by index (one directory listing; {} when it does not exist)."""
    found: dict[int, list[str]] = {}
    try:
        names = os.listdir(build)
    except FileNotFoundError:
        return found
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[2] == "npy" and parts[0].isdigit() and len(parts[1]) == 64:
            found.setdefault(int(parts[0]), []).append(name)
    return found


def has_chunk(build: Path, index: int) -> bool:
    """Whether `build` holds a file of chunk `index` (one listing)."""
    prefix = f"{index:06d}."
    try:
        return any(n.startswith(prefix) and n.endswith(".npy") for n in os.listdir(build))
    except FileNotFoundError:
        return False


def chunk_verified(build: Path, names: list[str]) -> bool:
    """Whether one of the files `names` (copies of one chunk in `build`) has the content its name says;
    copies that fail are removed."""
    for name in names:
        f = build / name
        try:
            if file_sha256(f) == name.split(".")[1]:
                return True
        except FileNotFoundError:
            continue
        log.warning("feature cache chunk %s fails its checksum: extracting it again", f)
        f.unlink(missing_ok=True)
    return False


def build_dir(path: Path, chunk_rows: int) -> Path:
    """The build directory of the entry at `path` in chunks of `chunk_rows` rows."""
    return path.with_name(f".{path.name}.build-{chunk_rows}")


def tmp_prefix() -> str:
    """The prefix of this host's temporary chunk files (`remove_dead_leftovers` cleans them)."""
    return f".tmp-{owner_tag()}-"


def entry_layers(path: Path) -> list[int] | None:
    """The layers an entry directory holds, from its name (`-L<n>`) or its manifest (`-S<hash>`)."""
    suffix = path.name.rpartition("-")[2]
    if suffix.startswith("L") and suffix[1:].isdigit():
        return list(range(int(suffix[1:])))
    if suffix.startswith("S"):
        layers = read_manifest(path).get("layers")
        return layers if isinstance(layers, list) else None
    return None


def chunk_layout(path: Path, rows: int) -> int | None:
    """The rows per chunk of the chunk files in `path`, read from their headers (for an entry whose
    manifest is lost): the largest chunk's rows, or None when there is no readable chunk."""
    largest = None
    for names in list_chunks(path).values():
        for name in names:
            try:
                n = int(np.load(path / name, mmap_mode="r", allow_pickle=False).shape[0])
            except (OSError, ValueError, IndexError):
                continue
            largest = max(largest or 0, min(n, rows))
    return largest


class _HashingWriter:
    """A write-only file object that hashes what passes through it (np.save writes through `write`)."""

    def __init__(self, fh) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def publish(
    key: dict, path: Path, build: Path, dtype: str, seconds: float, compute_reason: str
) -> None:
    """Write the manifest of the chunks in `build` (stored as `dtype`, float32 where they overflowed)
    and rename it to `path`. Call holding the entry's finish lock."""
    chunk_rows = int(build.name.rpartition("-")[2])
    rows, count = key["rows"], math.ceil(key["rows"] / chunk_rows)
    listed = list_chunks(build)
    for names in listed.values():
        for extra in sorted(names)[1:]:
            (build / extra).unlink(missing_ok=True)  # a second copy (only without file locks)
    missing = [i for i in range(count) if i not in listed]
    if missing:
        raise FeatureCacheError(
            f"feature cache build {build} lacks chunks {missing[:5]} after extraction"
        )
    chunks = []
    for i in range(count):
        f = build / sorted(listed[i])[0]
        array = np.load(f, mmap_mode="r", allow_pickle=False)  # reads the header only
        expected = (min(chunk_rows, rows - i * chunk_rows), len(key["layers"]))
        if array.shape[:2] != expected:
            f.unlink(missing_ok=True)  # the next run extracts it again
            raise FeatureCacheError(
                f"chunk {f} is {array.shape}, expected {expected} + (d,): removed; run again"
            )
        chunks.append(
            {
                "file": f.name,
                "rows": int(array.shape[0]),
                "dtype": str(array.dtype),
                "bytes": f.stat().st_size,
                "sha256": f.name.split(".")[1],
            }
        )
        dim = int(array.shape[2])
    wide = sum(c["dtype"] != dtype for c in chunks)
    manifest = {
        "key": key,
        "layers": key["layers"],
        "shape": [rows, len(key["layers"]), dim],
        "dtype": "float32" if wide else dtype,
        "float32_chunks": wide,
        "rows": rows,
        "chunk_rows": chunk_rows,
        "chunks": chunks,
        "build_seconds": seconds,
        "compute_reason": compute_reason,
    }
    if wide:
        log.info(
            "feature cache entry %s is float32: %d of %d chunks overflow float16",
            path,
            wide,
            count,
        )
    atomic_write(build / "manifest.json", json.dumps(manifest, indent=1), fsync=True)
    if path.exists():  # a damaged entry that find() could not reclaim
        reclaim(path, key)
    os.rename(build, path)
    fsync_dir(path.parent)


def reclaim(path: Path, key: dict) -> None:
    """Turn the damaged entry at `path` back into a build directory: its chunks are kept and verified
    there (by their content hash) when the build resumes; a manifest from other inputs drops them. Call
    holding the entry's finish lock."""
    manifest = read_manifest(path)
    chunk_rows = manifest.get("chunk_rows")
    if manifest and manifest.get("key") != key:
        shutil.rmtree(path, ignore_errors=True)  # built from other inputs: nothing to keep
        return
    if not isinstance(chunk_rows, int):  # manifest lost: the layout is in the chunk files
        chunk_rows = chunk_layout(path, key["rows"])
    if chunk_rows is None:
        shutil.rmtree(path, ignore_errors=True)  # no readable chunk to keep
        return
    build = build_dir(path, chunk_rows)
    (path / "manifest.json").unlink(missing_ok=True)
    if not build.exists():
        os.rename(path, build)
        return
    for names in list_chunks(path).values():
        for name in names:
            os.replace(path / name, build / name)
    shutil.rmtree(path, ignore_errors=True)
