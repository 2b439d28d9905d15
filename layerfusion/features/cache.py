"""The feature cache proper: keys, which entry serves a request, and building one (resumable, shared by
concurrent jobs and DDP ranks). See docs/cache.md."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from layerfusion.encoders.frozen import FrozenEncoder
from layerfusion.errors import ConfigError
from layerfusion.features.entry import (
    CachedFeatures,
    FeatureCacheError,
    build_dir,
    chunk_verified,
    entry_layers,
    file_sha256,
    has_chunk,
    list_chunks,
    open_entry,
    publish,
    read_manifest,
    reclaim,
    tmp_prefix,
    verify,
    write_chunk,
)
from layerfusion.features.extraction import (
    FEATURES_VERSION,
    FLOAT16_MAX,
    TOKEN_BUDGET,
    _progress,
    extract,
    extract_chunk,
    forward_batches,
    token_batches,
)
from layerfusion.features.locks import EntryLock
from layerfusion.features.ranks import Distributed, SingleProcess, on_rank_zero, open_on_every_rank
from layerfusion.files import remove_dead_leftovers
from layerfusion.fusion.heads import layer_set

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
CacheDtype = Literal["float16", "float32"]
CHUNK_BYTES = 128 * 2**20
"""Bytes of one chunk at most, as extracted (float32 rows x layers x hidden): the memory a chunk holds
until written. 128 MiB is 3,360 rows of MPNet's 13 layers x 768 and 248 rows of a 33-layer 4096-wide
decoder (whose 4,096 rows would be 2.2 GB)."""
CHUNK_ROWS = 4096
"""Rows of one chunk at most (`model.cache_chunk_rows`): the unit a killed extraction resumes from (4096
rows: about a minute of MPNet on two CPU cores, seconds on a GPU); a million rows make ~250 files; length
sorting within a chunk packs batches as tightly as sorting the whole split."""


class FeatureCache:
    """Pooled features `[N, len(layers), d]` of one (encoder, split, layer set), keyed by everything they
    depend on, stored in checksummed chunks that a killed extraction resumes from.

    Key (`key`): the features version (`FEATURES_VERSION`: the code that computes features), encoder
    content (weights, buffers, config), tokenizer, transformers major.minor, max length, pooling, weight
    and compute dtypes, storage dtype, the texts (SHA-256), the split, the row count and the layer set.

    Entry: `<root>/<encoder>/<split>-<digest>-L<n>` (layers 0..n-1) or `...-S<hash>` (another layer set):
    `manifest.json` and chunk files `<index>.<sha256>.npy` of `chunk_rows` rows (the last fewer). A
    request is served by the smallest complete entry holding its layers, else only those are extracted.

    Build: into `.<entry>.build-<chunk_rows>` beside the entry; jobs (and DDP ranks) sharing `root` claim
    chunks through file locks, so each chunk is extracted once; the first job to see every chunk writes
    the manifest and renames the build into place. A restarted build keeps every chunk whose hash
    verifies. DDP (`dist`): rank 0 decides and finishes, ranks share out the chunks, a failure on any rank
    is raised on every rank. docs/cache.md has the whole contract."""

    def __init__(
        self,
        root: str | Path,
        dtype: CacheDtype = "float16",
        batch_size: int | None = None,
        token_budget: int | None = TOKEN_BUDGET,
        chunk_rows: int = CHUNK_ROWS,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"cache dtype must be 'float16' or 'float32', got {dtype!r}")
        for name, value in (
            ("batch_size", batch_size),
            ("token_budget", token_budget),
            ("chunk_rows", chunk_rows),
            ("chunk_bytes", chunk_bytes),
        ):
            if value is not None and (int(value) != value or value < 1):
                raise ConfigError(f"feature cache {name} must be an integer >= 1, got {value!r}")
        self.root = Path(root).expanduser()
        self.dtype = dtype
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.chunk_rows = int(chunk_rows)
        self.chunk_bytes = int(chunk_bytes)
        self.last_build_seconds: float = 0.0

    def rows_per_chunk(self, layers: int, dim: int) -> int:
        """Rows per chunk for `layers` x `dim` features: at most `chunk_rows`, and at most as many float32
        rows as fit in `chunk_bytes` (at least one)."""
        return max(1, min(self.chunk_rows, self.chunk_bytes // (layers * dim * 4)))

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
            "features": FEATURES_VERSION,
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

    def find(self, key: dict, repair: bool = True) -> Path | None:
        """The smallest complete entry holding every layer of `key` (same inputs otherwise), or None.

        With `repair`, a damaged entry for exactly `key` (also one whose manifest is unreadable) is turned
        back into a build directory that keeps its chunks: call holding the entry's finish lock."""
        wanted, exact = set(key["layers"]), self.entry_dir(key)
        found = []
        stem = self._stem(key)
        for path in stem.parent.glob(f"{stem.name}-*"):
            held = entry_layers(path)
            if held is not None and wanted <= set(held):
                found.append((len(held), path.name, path, held))
        for _, _, path, held in sorted(found):
            problem = verify(path, {**key, "layers": held})
            if problem is None:
                return path
            if not repair:
                continue
            log.warning(
                "feature cache entry %s is unusable (%s): %s",
                path,
                problem,
                "rebuilding what fails verification" if path == exact else "not using it",
            )
            if path == exact:
                reclaim(path, key)
        if repair and exact.is_dir():  # an -S entry whose manifest cannot say which layers it holds
            log.warning(
                "feature cache entry %s is unusable (%s): rebuilding what fails verification",
                exact,
                verify(exact, key),
            )
            reclaim(exact, key)
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
        plan = on_rank_zero(dist, lambda: self._plan(key, path, encoder.hidden_size))
        if plan[0] == "hit":
            hit = Path(plan[1])
            served = "" if hit == path else f" (layers {key['layers']} of it)"
            log.info("feature cache hit: %s%s", hit, served)
            return open_on_every_rank(dist, hit).select(key["layers"])
        _, chunk_rows, present = plan
        build = build_dir(path, chunk_rows)
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
        done = on_rank_zero(
            dist,
            lambda: ("ok", str(self._finish(key, path, build, self.last_build_seconds, reason))),
        )
        return open_on_every_rank(dist, Path(done[1])).select(key["layers"])

    def _plan(self, key: dict, path: Path, dim: int) -> tuple:
        """Rank 0's decision: `("hit", entry)`, or `("build", chunk_rows, chunks on disk)` after checking
        free disk space for the others."""
        found = self.find(key, repair=False)  # a hit needs no lock (nor a writable cache_dir)
        if found is not None:
            return ("hit", str(found))
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = EntryLock(path)
        try:
            with lock.finishing():
                found = self.find(key)
                if found is not None:
                    lock.discard()
                    return ("hit", str(found))
        finally:
            lock.close()
        width = len(key["layers"])
        chunk_rows = self.rows_per_chunk(width, dim)
        layouts = {  # the builds on disk: chunk rows -> chunk count
            int(b.name.rpartition("-")[2]): len(list_chunks(b))
            for b in path.parent.glob(f".{path.name}.build-*")
            if b.name.rpartition("-")[2].isdigit()
        }
        resumed = max(layouts, key=lambda n: (layouts[n], n == chunk_rows), default=chunk_rows)
        if layouts.get(resumed) and resumed != chunk_rows:  # resume in the layout with most chunks
            log.info("resuming %s in its chunks of %d rows", build_dir(path, resumed), resumed)
            chunk_rows = resumed
        present = sorted(list_chunks(build_dir(path, chunk_rows)))
        rows = key["rows"]
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
                f"{free / 2**20:,.0f} MiB are free there ({missing:,} rows x {width} layers x {dim} x "
                f"{np.dtype(self.dtype).itemsize} B); free space or set model.cache_dir elsewhere"
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
        return ("build", chunk_rows, present)

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
        missing chunk (and those that failed verification) into `build`, each under its claim; a chunk
        another job holds is left for later and skipped if that job published it meanwhile."""
        if (path / "manifest.json").is_file():  # another job finished the entry meanwhile
            return
        build.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(build, tmp_prefix())
        lock = EntryLock(path)
        try:
            lock.building(chunk_rows)
            self._extract_claimed(
                encoder, texts, key, path, build, chunk_rows, present, device, rank, world, lock
            )
        finally:
            lock.close()

    def _extract_claimed(
        self, encoder, texts, key, path, build, chunk_rows, present, device, rank, world, lock
    ) -> None:
        count = math.ceil(len(texts) / chunk_rows)
        files = list_chunks(build)  # one listing: verification is linear in the chunks
        missing = sorted(set(range(count)) - set(present))
        checked = present[rank::world]
        failed = [i for i in checked if not chunk_verified(build, files.get(i, []))]
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
        total = sum(min(chunk_rows, len(texts) - i * chunk_rows) for i in todo)
        start, overflowed, done = time.perf_counter(), 0, []
        with _progress() as bar:
            task = bar.add_task(f"extract {desc}", total=total)

            def make(i: int) -> bool:
                """Extract chunk `i` (claimed) unless it exists; False once the entry is complete."""
                nonlocal overflowed
                try:
                    if (path / "manifest.json").is_file():  # another job finished the entry
                        return False
                    if has_chunk(build, i):  # another job published it meanwhile
                        return True
                    first = i * chunk_rows
                    array = extract_chunk(
                        encoder,
                        texts[first : first + chunk_rows],
                        key["layers"],
                        device,
                        self.token_budget,
                        self.batch_size,
                        where=lambda r: f"split {key['split']!r}, row {first + r}",
                        advance=lambda n: bar.advance(task, n),
                    )
                    with np.errstate(over="ignore"):  # checked right below
                        stored = array.astype(self.dtype, copy=False)  # float32: no copy
                    if not np.isfinite(stored).all():
                        stored, overflowed = array, overflowed + 1
                    if write_chunk(build, i, stored) is None:
                        return False
                    done.append(len(array))
                    return True
                finally:
                    lock.release(i)

            waiting = []
            for i in todo:  # first the chunks no other job is extracting
                if not lock.claim(i):
                    waiting.append(i)
                elif not make(i):
                    break
            else:
                for (
                    i
                ) in waiting:  # then wait for the others' claims: their chunk exists, or they died
                    lock.claim(i, block=True)
                    if not make(i):
                        break
        if overflowed:
            log.info(
                "%s: pooled values of %d chunks exceed float16's range (|x| > %g): those chunks are "
                "stored in float32",
                desc,
                overflowed,
                FLOAT16_MAX,
            )
        if done:
            seconds = time.perf_counter() - start
            log.info(
                "extracted %s: %d rows in %.1f s (%.0f ex/s), %d chunks -> %s",
                desc,
                sum(done),
                seconds,
                sum(done) / max(seconds, 1e-9),
                len(done),
                build,
            )

    def _finish(
        self, key: dict, path: Path, build: Path, seconds: float, compute_reason: str
    ) -> Path:
        """Rank 0: under the entry's finish lock, write the manifest of the complete chunks in `build`
        and rename it into place (unless another job did); remove builds no live job uses."""
        lock = EntryLock(path)
        try:
            with lock.finishing():
                if verify(path, key) is not None:
                    publish(key, path, build, self.dtype, seconds, compute_reason)
                for other in path.parent.glob(f".{path.name}.build-*"):
                    layout = other.name.rpartition("-")[2]
                    if layout.isdigit() and not lock.layout_in_use(int(layout)):
                        shutil.rmtree(other, ignore_errors=True)  # never resumed: the entry is done
                lock.discard()
        finally:
            lock.close()
        return path


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


def _safe(name: str) -> str:
    return name.replace("/", "__")


__all__ = [
    "CHUNK_BYTES",
    "CHUNK_ROWS",
    "FEATURES_VERSION",
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
