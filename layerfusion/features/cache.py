"""On-disk cache of pooled per-layer features: chunked, resumable, checksummed, memory-mapped."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from layerfusion.encoders.frozen import FrozenEncoder
from layerfusion.errors import ConfigError, LayerFusionError
from layerfusion.leftovers import owner_tag, remove_dead_leftovers

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
CacheDtype = Literal["float16", "float32"]
CHUNK_ROWS = 4096
"""Rows per chunk file. A kill loses at most the chunk in progress (4096 rows: about a minute of MPNet on
two CPU cores, seconds on a GPU); the chunk is held in fp32 until written (4096 x 13 x 768 x 4 B = 164 MB
for MPNet's every layer); a million rows make ~250 files; length sorting within a chunk packs batches as
tightly as sorting the whole split."""
TOKEN_BUDGET = 4096
"""Padded tokens per extraction batch (rows x longest row). Measured in benchmarks/scale.py (MPNet, every
layer, 2-core CPU): on R8 documents of 512 tokens the peak RSS growth was 460 MiB at 4096 tokens, 901 at
8192, 1017 at 16384 and 1910 with the former fixed 64 rows (32,768 tokens); on SST-2 sentences 4096
tokens (~130 rows a batch) ran as fast as 64 rows, 8192 and 16384 were 8% and 70% slower. On a GPU a
larger budget may be faster (not measured here): `model.extract_token_budget`."""
FLOAT16_MAX = float(np.finfo(np.float16).max)


class FeatureCacheError(LayerFusionError, RuntimeError):
    """A feature cache entry cannot be built or read: the message names the entry, split or row."""


class Distributed(Protocol):
    """What the cache needs of a process group (a Lightning strategy or Fabric has it)."""

    global_rank: int
    world_size: int

    def broadcast(self, obj, src: int = 0): ...


class SingleProcess:
    """The process group of one process."""

    global_rank = 0
    world_size = 1

    def broadcast(self, obj, src: int = 0):
        return obj


class FeatureCache:
    """Pooled features `[N, len(layers), d]` of one (encoder, split, layer set), keyed by everything they
    depend on, stored in checksummed chunks that a killed extraction resumes from.

    Key (`key`): encoder content (weights, buffers, config: `FrozenEncoder.fingerprint`), tokenizer
    (definition, padding and truncation side), transformers major.minor, max length, pooling, weight
    dtype and the precision the encoder computed in, storage dtype, the texts (SHA-256, length-prefixed),
    the split name, the row count and the exact sorted layer set (absolute indices; None = all layers).

    Entry: `<root>/<encoder>/<split>-<digest>-L<n>` holds layers 0..n-1 (n = all layers: the all-layer
    entry), `...-S<hash>` any other set. It holds `manifest.json` (key, layers, shape, dtype, chunk
    rows, each chunk's file, rows, dtype, bytes and SHA-256, `build_seconds`, `compute_reason`) and the
    chunk files `<index>.<sha256>.npy`, each `chunk_rows` rows (the last fewer). A request is served by
    the smallest complete entry whose layer set contains it (the all-layer entry serves every subset),
    without extraction; otherwise only the requested layers are extracted, each encoder stopping at the
    deepest one (early exit).

    Build: chunks are written to `.<entry>.build-<chunk_rows>` beside the entry, each to a temporary name,
    fsynced and renamed to its content hash (so a chunk file is complete or absent, and two jobs with the
    same key never delete each other's chunks); a restarted build keeps every chunk whose hash verifies and
    extracts the others. Chunks are tokenised one at a time and run in length-sorted batches of at most
    `token_budget` padded tokens (and `batch_size` rows, if set). When all chunks exist, the manifest is
    written (fsynced) and the build directory renamed into place. Free disk space is checked first.

    DDP (`dist`: a Lightning strategy or anything with `global_rank`, `world_size`, `broadcast`): rank 0
    decides hit or build and broadcasts it; the ranks share out the missing chunks (a fresh build: chunk i
    on rank i % world) and verify the others; rank 0 writes the manifest; a failure on any rank is raised
    on every rank. `root` must be a filesystem all ranks see.

    Checks: at open, the manifest matches the key and every chunk file has its recorded size (cheap); each
    chunk's SHA-256 is verified the first time a process reads it. A damaged entry is turned back into a
    build directory and its bad chunks re-extracted; a chunk that fails its checksum on read is removed and
    the read fails with a `FeatureCacheError` (the next run re-extracts that chunk). Pooled values that
    are not finite in float16 make that chunk float32 (the entry then reads as float32; the manifest and
    one log line say so); NaN or inf from the encoder itself is an error naming encoder, split and row.
    """

    def __init__(
        self,
        root: str | Path,
        dtype: CacheDtype = "float16",
        batch_size: int | None = None,
        token_budget: int | None = TOKEN_BUDGET,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"cache dtype must be 'float16' or 'float32', got {dtype!r}")
        for name, value in (
            ("batch_size", batch_size),
            ("token_budget", token_budget),
            ("chunk_rows", chunk_rows),
        ):
            if value is not None and (int(value) != value or value < 1):
                raise ConfigError(f"feature cache {name} must be an integer >= 1, got {value!r}")
        self.root = Path(root).expanduser()
        self.dtype = dtype
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.chunk_rows = int(chunk_rows)
        self.last_build_seconds: float = 0.0

    # -- keys and entries ------------------------------------------------------------------------

    def key(
        self,
        encoder: FrozenEncoder,
        texts: Sequence[str],
        split: str,
        device: torch.device | str = "cpu",
        layers: Sequence[int] | None = None,
    ) -> dict:
        """Everything the features of `layers` (absolute indices, default all) of this split depend on."""
        import transformers

        return {
            "format": FORMAT_VERSION,
            "encoder": encoder.spec.name,
            "weights_sha256": encoder.fingerprint(),
            "tokenizer_sha256": encoder.tokenizer_fingerprint(),
            "transformers": ".".join(transformers.__version__.split(".")[:2]),
            "max_length": encoder.max_length,
            "pooling": encoder.spec.pooling,
            "encoder_dtype": str(next(encoder.model.parameters()).dtype),
            "compute_dtype": encoder.compute_precision(device),
            "dtype": self.dtype,
            "data_sha256": texts_fingerprint(texts, split),
            "split": split,
            "rows": len(texts),
            "layers": layer_set(layers, encoder.num_layers, encoder.spec.key),
        }

    def entry_dir(self, key: dict) -> Path:
        """The directory of the entry for exactly `key`."""
        layers = key["layers"]
        if layers == list(range(len(layers))):
            suffix = f"L{len(layers)}"
        else:
            suffix = "S" + hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:12]
        return self._stem(key).with_name(f"{self._stem(key).name}-{suffix}")

    def find(self, key: dict) -> Path | None:
        """The smallest complete entry holding every layer of `key` (same inputs otherwise), or None.

        A damaged entry for exactly `key` is turned back into a build directory (its good chunks are kept).
        Only one process of a group may call this (it may move entries)."""
        wanted, exact = set(key["layers"]), self.entry_dir(key)
        found = []
        stem = self._stem(key)
        for path in stem.parent.glob(f"{stem.name}-*"):
            held = _entry_layers(path)
            if held is not None and wanted <= set(held):
                found.append((len(held), path.name, path, held))
        for _, _, path, held in sorted(found):
            problem = verify(path, {**key, "layers": held})
            if problem is None:
                return path
            action = "rebuilding it" if path == exact else "not using it"
            log.warning("feature cache entry %s is unusable (%s): %s", path, problem, action)
            if path == exact:
                self._reclaim(path, key)
        return None

    def _stem(self, key: dict) -> Path:
        """The entry path of `key` without its layer set (entries differing only in layers share it)."""
        rest = {k: v for k, v in key.items() if k != "layers"}
        digest = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / _safe(key["encoder"]) / f"{key['split']}-{digest}"

    # -- load or build ---------------------------------------------------------------------------

    def load_or_build(
        self,
        encoder: FrozenEncoder,
        texts: Sequence[str],
        split: str,
        device: torch.device | str = "cpu",
        layers: Sequence[int] | None = None,
        dist: Distributed | None = None,
    ) -> CachedFeatures:
        """The features of `layers` (default all) of `texts`: read from an entry that holds them, or
        extracted (resuming a killed build) and written first. Sets `last_build_seconds` (0 on a hit)."""
        dist = dist or SingleProcess()
        rank, world = dist.global_rank, dist.world_size
        self.last_build_seconds = 0.0
        if not texts:
            raise FeatureCacheError(
                f"split {split!r} has no texts: nothing to extract for encoder {encoder.spec.key}"
            )
        key = self.key(encoder, texts, split, device, layers)
        path = self.entry_dir(key)
        plan = _on_rank_zero(dist, lambda: self._plan(key, path, encoder.hidden_size))
        if plan[0] == "hit":
            hit = Path(plan[1])
            served = "" if hit == path else f" (layers {key['layers']} of it)"
            log.info("feature cache hit: %s%s", hit, served)
            return open_entry(hit).select(key["layers"])
        _, chunk_rows, present = plan
        build = _build_dir(path, chunk_rows)
        start, failure = time.perf_counter(), None
        try:
            self._extract_chunks(
                encoder, texts, key, path, build, chunk_rows, present, device, rank, world
            )
        except Exception as err:  # every rank must learn of it, or the others wait forever
            failure = err
        seconds = time.perf_counter() - start
        statuses = [
            dist.broadcast((None if failure is None else str(failure), seconds), src=r)
            for r in range(world)
        ]
        if failure is not None:
            raise failure
        for r, (message, _) in enumerate(statuses):
            if message is not None:
                raise FeatureCacheError(f"feature extraction failed on rank {r}: {message}")
        self.last_build_seconds = max(s for _, s in statuses)  # ranks ran in parallel
        reason = encoder.compute_reason(device)
        done = _on_rank_zero(
            dist,
            lambda: ("ok", str(self._finish(key, path, build, self.last_build_seconds, reason))),
        )
        return open_entry(Path(done[1])).select(key["layers"])

    def _plan(self, key: dict, path: Path, dim: int) -> tuple:
        """Rank 0's decision: `("hit", entry)`, or `("build", chunk_rows, chunks on disk)` after checking
        free disk space for the others."""
        found = self.find(key)
        if found is not None:
            return ("hit", str(found))
        path.parent.mkdir(parents=True, exist_ok=True)
        builds = sorted(path.parent.glob(f".{path.name}.build-*"), key=_chunk_count)
        chunk_rows = self.chunk_rows
        if builds and builds[-1].name.rpartition("-")[2].isdigit():
            chunk_rows = int(builds[-1].name.rpartition("-")[2])  # resume in the existing layout
            if chunk_rows != self.chunk_rows:
                log.info("resuming %s in its chunks of %d rows", builds[-1], chunk_rows)
        build = _build_dir(path, chunk_rows)
        rows, width = key["rows"], len(key["layers"])
        present = {_chunk_index(p) for p in build.glob("*.npy")} if build.is_dir() else set()
        missing = sum(
            min(chunk_rows, rows - i * chunk_rows)
            for i in range(math.ceil(rows / chunk_rows))
            if i not in present
        )
        needed = missing * width * dim * np.dtype(self.dtype).itemsize
        free = shutil.disk_usage(path.parent).free
        if needed > free:
            raise FeatureCacheError(
                f"not enough disk space for feature cache entry {path}: it needs {needed / 2**20:,.0f} MiB, "
                f"{free / 2**20:,.0f} MiB are free there; free space or set model.cache_dir elsewhere"
            )
        log.info(  # the cache sizing rule, before the work starts: rows x layers x hidden x bytes
            "extracting %s/%s: %d rows x %d layers x %d hidden x %d bytes (%s) = %.1f MiB -> %s",
            key["encoder"],
            key["split"],
            missing,
            width,
            dim,
            np.dtype(self.dtype).itemsize,
            self.dtype,
            needed / 2**20,
            path.parent,
        )
        return ("build", chunk_rows, sorted(present))

    def _extract_chunks(
        self,
        encoder: FrozenEncoder,
        texts: Sequence[str],
        key: dict,
        path: Path,
        build: Path,
        chunk_rows: int,
        present: list[int],
        device,
        rank: int,
        world: int,
    ) -> None:
        """This rank's share of the build: verify every world-th chunk on disk, extract every world-th
        missing chunk (and those that failed verification) into `build`. A fresh build gives chunk i to
        rank i % world; a resumed one shares out the chunks still missing, so no rank idles long."""
        build.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(build, _tmp_prefix())
        count = math.ceil(len(texts) / chunk_rows)
        missing = sorted(set(range(count)) - set(present))
        checked = present[rank::world]
        failed = [i for i in checked if not _chunk_verified(build, i)]
        todo = sorted(missing[rank::world] + failed)
        desc = f"{encoder.spec.key}/{key['split']}" + (f" rank {rank}/{world}" if world > 1 else "")
        if checked:
            log.info(
                "resuming %s: %d chunks already built (verified), %d of %d to extract in %s",
                desc,
                len(checked) - len(failed),
                len(todo),
                count,
                build,
            )
        rows = sum(min(chunk_rows, len(texts) - i * chunk_rows) for i in todo)
        start, overflowed = time.perf_counter(), 0
        encoder.to(device)
        with _progress() as bar:
            task = bar.add_task(f"extract {desc}", total=rows)
            for i in todo:
                if (path / "manifest.json").is_file():  # another job finished the entry meanwhile
                    return
                first = i * chunk_rows
                array = extract_chunk(
                    encoder,
                    texts[first : first + chunk_rows],
                    key["layers"],
                    device,
                    self.token_budget,
                    self.batch_size,
                    where=lambda r, first=first: f"split {key['split']!r}, row {first + r}",
                    advance=lambda n: bar.advance(task, n),
                )
                with np.errstate(over="ignore"):  # checked right below
                    stored = array.astype(self.dtype)
                if not np.isfinite(stored).all():
                    stored, overflowed = array, overflowed + 1
                _write_chunk(build, i, stored)
        if overflowed:
            log.info(
                "%s: pooled values of %d chunks exceed float16's range (|x| > %g): those chunks are "
                "stored in float32",
                desc,
                overflowed,
                FLOAT16_MAX,
            )
        if todo:
            seconds = time.perf_counter() - start
            log.info(
                "extracted %s: %d rows in %.1f s (%.0f ex/s), %d chunks -> %s",
                desc,
                rows,
                seconds,
                rows / max(seconds, 1e-9),
                len(todo),
                build,
            )

    def _finish(
        self, key: dict, path: Path, build: Path, seconds: float, compute_reason: str
    ) -> Path:
        """Rank 0: write the manifest of the complete chunks in `build` and rename it into place."""
        if verify(path, key) is None:  # another job finished it first
            shutil.rmtree(build, ignore_errors=True)
            return path
        chunk_rows = int(build.name.rpartition("-")[2])
        rows, count = key["rows"], math.ceil(key["rows"] / chunk_rows)
        files: dict[int, Path] = {}
        for f in sorted(build.glob("*.npy")):
            if _chunk_index(f) in files:
                f.unlink(missing_ok=True)  # a second copy from a concurrent job
            else:
                files[_chunk_index(f)] = f
        missing = [i for i in range(count) if i not in files]
        if missing:
            raise FeatureCacheError(
                f"feature cache build {build} lacks chunks {missing[:5]} after extraction"
            )
        chunks = []
        for i in range(count):
            f = files[i]
            array = np.load(f, mmap_mode="r", allow_pickle=False)  # reads the header only
            expected = (min(chunk_rows, rows - i * chunk_rows), len(key["layers"]))
            if array.shape[:2] != expected:
                raise FeatureCacheError(f"chunk {f} is {array.shape}, expected {expected} + (d,)")
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
        wide = sum(c["dtype"] != self.dtype for c in chunks)
        manifest = {
            "key": key,
            "layers": key["layers"],
            "shape": [rows, len(key["layers"]), dim],
            "dtype": "float32" if wide else self.dtype,
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
        _write_atomic(build / "manifest.json", json.dumps(manifest, indent=1).encode())
        _fsync_dir(build)
        try:
            os.rename(build, path)
        except OSError:  # another job renamed its build first
            if verify(path, key) is not None:
                raise
            shutil.rmtree(build, ignore_errors=True)
        _fsync_dir(path.parent)
        return path

    def _reclaim(self, path: Path, key: dict) -> None:
        """Turn the damaged entry at `path` back into a build directory (its chunks are re-verified there)."""
        manifest = read_manifest(path)
        if manifest.get("key") != key or not isinstance(manifest.get("chunk_rows"), int):
            shutil.rmtree(path, ignore_errors=True)  # other inputs or no layout: nothing to keep
            return
        build = _build_dir(path, manifest["chunk_rows"])
        (path / "manifest.json").unlink(missing_ok=True)
        if not build.exists():
            os.rename(path, build)
            return
        for f in path.glob("*.npy"):
            os.replace(f, build / f.name)
        shutil.rmtree(path, ignore_errors=True)


class CachedFeatures:
    """A cache entry read through memory maps: `feats[rows]` is a tensor `[B, len(layers), d]` in the
    entry's dtype, for rows given as a LongTensor, list, slice or int; `feats[rows, ...]` indexes further
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
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
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
            if local[-1] - local[0] == end - start - 1:  # sorted and consecutive: one slice
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


# -- extraction ----------------------------------------------------------------------------------


def extract_chunk(
    encoder: FrozenEncoder,
    texts: Sequence[str],
    layers: list[int],
    device,
    token_budget: int | None,
    max_rows: int | None,
    where: Callable[[int], str] = lambda r: f"row {r}",
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """Pooled `layers` of `texts` as fp32 `[N, len(layers), d]` (the encoder stops at the deepest layer);
    NaN or inf from the encoder raises a `FeatureCacheError` naming `where(row)`."""
    out = np.empty((len(texts), len(layers), encoder.hidden_size), np.float32)
    for rows, feats in forward_batches(encoder, texts, layers, device, token_budget, max_rows):
        bad = ~torch.isfinite(feats)
        if bad.any():
            r, j = (int(v) for v in bad.nonzero()[0][:2])
            kind = "NaN" if feats[r, j].isnan().any() else "inf"
            raise FeatureCacheError(
                f"encoder {encoder.spec.key} gave {kind} at layer {layers[j]} for {where(rows[r])} "
                f"(text {texts[rows[r]][:60]!r}): the encoder's own output is not finite; check its "
                "weights and compute_dtype (e.g. float16 overflow: use bfloat16 or float32)"
            )
        out[rows] = feats.numpy()
        advance(len(rows))
    return out


def extract(
    encoder: FrozenEncoder,
    texts: Sequence[str],
    out: np.ndarray,
    batch_size: int | None,
    device,
    desc: str = "features",
    sort_by_length: bool = True,
    token_budget: int | None = None,
) -> None:
    """Fill `out[i]` with the pooled layers 0..k of `texts[i]` (`out` is `[N, k+1, d]`; the encoder stops
    after layer k), in length-sorted batches (longest first) of at most `batch_size` rows and
    `token_budget` padded tokens. `sort_by_length=False` keeps the given order (only for measuring what
    bucketing saves)."""
    layers = list(range(out.shape[1]))
    with _progress() as bar:
        task = bar.add_task(f"extract {desc}", total=len(texts))
        batches = forward_batches(
            encoder, texts, layers, device, token_budget, batch_size, sort_by_length
        )
        for rows, feats in batches:
            out[rows] = feats.numpy().astype(out.dtype)
            bar.advance(task, len(rows))


def forward_batches(
    encoder: FrozenEncoder,
    texts: Sequence[str],
    layers: list[int],
    device,
    token_budget: int | None,
    max_rows: int | None,
    sort_by_length: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(rows, fp32 CPU features `[B, len(layers), d]`) per batch of `token_batches` over `texts`."""
    tok = encoder.tokenizer
    ids = tok(list(texts), truncation=True, max_length=encoder.max_length)["input_ids"]
    depth = max(layers)
    pick = None if layers == list(range(depth + 1)) else torch.tensor(layers)
    encoder.to(device)
    with torch.inference_mode():
        for rows in token_batches([len(i) for i in ids], token_budget, max_rows, sort_by_length):
            batch = tok.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            feats = encoder(
                batch["input_ids"].to(device), batch["attention_mask"].to(device), depth=depth
            )
            if pick is not None:
                feats = feats.index_select(1, pick.to(feats.device))
            yield rows, feats.float().cpu()


def token_batches(
    lengths: Sequence[int],
    token_budget: int | None,
    max_rows: int | None = None,
    sort_by_length: bool = True,
) -> list[list[int]]:
    """Row indices in batches (longest rows first) whose padded size, rows x longest row, stays within
    `token_budget` and whose row count within `max_rows` (None: no bound). A row longer than the budget
    is a batch of its own."""
    order = (
        sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        if sort_by_length
        else range(len(lengths))
    )
    budget, cap = token_budget or math.inf, max_rows or math.inf
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        wider = max(width, lengths[i])
        if current and ((len(current) + 1) * wider > budget or len(current) >= cap):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        width = wider
    if current:
        batches.append(current)
    return batches


# -- helpers -------------------------------------------------------------------------------------


def layer_set(layers: Sequence[int] | None, num_layers: int, encoder: str = "encoder") -> list[int]:
    """`layers` as a sorted list of distinct absolute indices (negative counts from the end; None = all)."""
    if layers is None:
        return list(range(num_layers))
    if not layers or any(not -num_layers <= int(i) < num_layers for i in layers):
        raise ConfigError(
            f"layers {list(layers)} of {encoder}: need at least one, each in 0..{num_layers - 1} "
            "(or negative from the end)"
        )
    return sorted({int(i) % num_layers for i in layers})


def texts_fingerprint(texts: Sequence[str], split: str = "texts") -> str:
    """SHA-256 over the texts in order, each prefixed with its UTF-8 length (so no two lists collide)."""
    h = hashlib.sha256()
    for i, t in enumerate(texts):
        try:
            data = t.encode("utf-8")
        except UnicodeEncodeError as err:
            raise FeatureCacheError(
                f"{split}: text {i} is not valid Unicode ({err.reason} at character {err.start}): "
                "a lone surrogate; fix the source's encoding"
            ) from None
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _on_rank_zero(dist: Distributed, decide: Callable[[], tuple]) -> tuple:
    """`decide()` on rank 0, broadcast to every rank; an error there is raised on every rank."""
    outcome = None
    if dist.global_rank == 0:
        try:
            outcome = decide()
        except Exception as err:  # raised on every rank below, not only here
            message = (
                str(err) if isinstance(err, LayerFusionError) else f"{type(err).__name__}: {err}"
            )
            outcome = ("error", message)
    outcome = dist.broadcast(outcome, src=0)
    if outcome[0] == "error":
        raise FeatureCacheError(outcome[1])
    return outcome


def _write_chunk(build: Path, index: int, array: np.ndarray) -> Path | None:
    """Write chunk `index` atomically as `<index>.<sha256>.npy` (hashed as written, fsynced)."""
    tmp = build / f"{_tmp_prefix()}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            np.save(writer, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        final = build / f"{index:06d}.{writer.sha.hexdigest()}.npy"
        os.replace(tmp, final)
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


class _HashingWriter:
    """A write-only file object that hashes what passes through it (np.save writes through `write`)."""

    def __init__(self, fh) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a fsynced temporary file and a rename."""
    tmp = path.with_name(f"{_tmp_prefix()}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
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


def _chunk_verified(build: Path, index: int) -> bool:
    """Whether `build` holds chunk `index` with the content its name says (bad copies are removed)."""
    for f in build.glob(f"{index:06d}.*.npy"):
        try:
            if file_sha256(f) == f.name.split(".")[1]:
                return True
        except FileNotFoundError:
            continue
        log.warning("feature cache chunk %s fails its checksum: extracting it again", f)
        f.unlink(missing_ok=True)
    return False


def _chunk_index(f: Path) -> int:
    return int(f.name.split(".")[0])


def _chunk_count(build: Path) -> int:
    return len(list(build.glob("*.npy")))


def _build_dir(path: Path, chunk_rows: int) -> Path:
    return path.with_name(f".{path.name}.build-{chunk_rows}")


def _tmp_prefix() -> str:
    return f".tmp-{owner_tag()}-"


def _entry_layers(path: Path) -> list[int] | None:
    """The layers an entry directory holds, from its name (`-L<n>`) or its manifest (`-S<hash>`)."""
    suffix = path.name.rpartition("-")[2]
    if suffix.startswith("L") and suffix[1:].isdigit():
        return list(range(int(suffix[1:])))
    if suffix.startswith("S"):
        layers = read_manifest(path).get("layers")
        return layers if isinstance(layers, list) else None
    return None


def _progress():
    """A rich progress bar with examples/s (drawn on a terminal; the log line after it says the same)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.0f} ex/s" if task.speed else "- ex/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Speed(),
        TimeRemainingColumn(),
        disable=not sys.stderr.isatty(),
    )


def _safe(name: str) -> str:
    return name.replace("/", "__")
