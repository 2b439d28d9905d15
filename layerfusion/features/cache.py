"""On-disk cache of pooled per-layer features: chunked, resumable, checksummed, memory-mapped."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from layerfusion.encoders.frozen import FrozenEncoder
from layerfusion.errors import ConfigError, LayerFusionError
from layerfusion.features.entry import (
    CachedFeatures,
    FeatureCacheError,
    _build_dir,
    _chunk_count,
    _chunk_index,
    _chunk_verified,
    _entry_layers,
    _tmp_prefix,
    _write_chunk,
    file_sha256,
    open_entry,
    read_manifest,
    verify,
)
from layerfusion.features.extraction import (
    FLOAT16_MAX,
    TOKEN_BUDGET,
    _progress,
    extract,
    extract_chunk,
    forward_batches,
    token_batches,
)
from layerfusion.files import atomic_write, fsync_dir, remove_dead_leftovers

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
CacheDtype = Literal["float16", "float32"]
CHUNK_ROWS = 4096
"""Rows per chunk file. A kill loses at most the chunk in progress (4096 rows: about a minute of MPNet on
two CPU cores, seconds on a GPU); the chunk is held in fp32 until written (4096 x 13 x 768 x 4 B = 164 MB
for MPNet's every layer); a million rows make ~250 files; length sorting within a chunk packs batches as
tightly as sorting the whole split."""


# -- process groups ----------------------------------------------------------------------------


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
        atomic_write(build / "manifest.json", json.dumps(manifest, indent=1), fsync=True)
        fsync_dir(build)
        try:
            os.rename(build, path)
        except OSError:  # another job renamed its build first
            if verify(path, key) is not None:
                raise
            shutil.rmtree(build, ignore_errors=True)
        fsync_dir(path.parent)
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


def _safe(name: str) -> str:
    return name.replace("/", "__")


__all__ = [
    "CHUNK_ROWS",
    "FLOAT16_MAX",
    "FORMAT_VERSION",
    "TOKEN_BUDGET",
    "CacheDtype",
    "CachedFeatures",
    "Distributed",
    "FeatureCache",
    "FeatureCacheError",
    "SingleProcess",
    "extract",
    "extract_chunk",
    "file_sha256",
    "forward_batches",
    "layer_set",
    "open_entry",
    "read_manifest",
    "texts_fingerprint",
    "token_batches",
    "verify",
]
