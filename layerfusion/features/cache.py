"""On-disk cache of pooled per-layer features: computed once, memory-mapped, verified before use."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from layerfusion.encoders.frozen import FrozenEncoder
from layerfusion.errors import ConfigError
from layerfusion.leftovers import remove_dead_leftovers

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
CacheDtype = Literal["float16", "float32"]


class FeatureCache:
    """Features `[N, L, d]` of one (encoder, split), keyed by everything they depend on.

    Key: encoder weights (content hash), tokenizer, max length, pooling, the precision the encoder
    computed in, storage dtype, the split's texts (content hash), the split name, and the number of
    layers kept (layers 0..depth: extraction stopped at the deepest layer needed). An entry with more
    layers serves a request for fewer (sliced, not re-extracted). An entry is a directory holding
    `features.npy` and `manifest.json` (shape, dtype, rows, SHA-256 of the array file); it is
    written to a temporary directory and renamed into place, so a killed run leaves no entry
    that looks complete. A partial, corrupt or mismatched entry is reported and rebuilt.
    """

    def __init__(
        self, root: str | Path, dtype: CacheDtype = "float16", batch_size: int = 64
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"cache dtype must be 'float16' or 'float32', got {dtype!r}")
        self.root = Path(root).expanduser()
        self.dtype = dtype
        self.batch_size = batch_size
        self.last_build_seconds: float | None = None

    def key(
        self,
        encoder: FrozenEncoder,
        texts: list[str],
        split: str,
        device: torch.device | str = "cpu",
        depth: int | None = None,
    ) -> dict:
        """Everything the features of this split depend on (layers 0..`depth`, default all, extracted on `device`)."""
        return {
            "format": FORMAT_VERSION,
            "encoder": encoder.spec.name,
            "weights_sha256": encoder.fingerprint(),
            "tokenizer_sha256": encoder.tokenizer_fingerprint(),
            "max_length": encoder.max_length,
            "pooling": encoder.spec.pooling,
            "encoder_dtype": str(next(encoder.model.parameters()).dtype),
            "compute_dtype": encoder.compute_precision(device),
            "dtype": self.dtype,
            "data_sha256": texts_fingerprint(texts),
            "split": split,
            "rows": len(texts),
            "layers": encoder.num_layers if depth is None else depth + 1,
        }

    def entry_dir(self, key: dict) -> Path:
        """The directory of the entry for exactly `key`."""
        return self._stem(key).with_name(f"{self._stem(key).name}-L{key['layers']}")

    def find(self, key: dict) -> Path | None:
        """The directory of a complete entry that serves `key`: same inputs, at least as many layers."""
        stem = self._stem(key)
        found = []
        for path in stem.parent.glob(f"{stem.name}-L*"):
            layers = path.name.rpartition("-L")[2]
            if layers.isdigit() and int(layers) >= key["layers"]:
                found.append((int(layers), path))
        for layers, path in sorted(found):  # the smallest entry that has every layer asked for
            if verify(path, {**key, "layers": layers}) is None:
                return path
        return None

    def _stem(self, key: dict) -> Path:
        """The entry path of `key` without its layer count (entries differing only in depth share it)."""
        rest = {k: v for k, v in key.items() if k != "layers"}
        digest = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / _safe(key["encoder"]) / f"{key['split']}-{digest}"

    def load_or_build(
        self,
        encoder: FrozenEncoder,
        texts: list[str],
        split: str,
        device: torch.device | str = "cpu",
        shard: tuple[int, int] = (0, 1),
        barrier: Callable[[], None] | None = None,
        depth: int | None = None,
    ) -> torch.Tensor:
        """The features `[N, depth+1, d]` of `texts` (layers 0..depth, default all), read from a valid cache
        entry (one with more layers is sliced) or extracted and written first; extraction stops at `depth`.

        With `shard=(rank, world_size)` (DDP), each rank extracts rows `rank::world_size` into a part
        entry, rank 0 merges the parts into the full entry, and every rank reads the full entry;
        `barrier` must synchronise all ranks, and `root` must be on a filesystem they all see.
        """
        key = self.key(encoder, texts, split, device, depth)
        path = self.entry_dir(key)
        rank, world = shard
        self.last_build_seconds = 0.0
        if self._usable(path, key, may_delete=rank == 0):
            log.info("feature cache hit: %s", path)
            return open_entry(path)
        deeper = self.find(key)
        if deeper is not None:
            log.info("feature cache hit: %s (layers 0..%d of it)", deeper, key["layers"] - 1)
            return open_entry(deeper)[:, : key["layers"]]
        start = time.perf_counter()
        if world == 1:
            self._extract_entry(encoder, texts, key, path, device)
        else:
            part_key = {**key, "shard": [rank, world]}
            part = path.with_name(f"{path.name}.part{rank}of{world}")
            if not self._usable(part, part_key, may_delete=True):
                self._extract_entry(encoder, texts[rank::world], part_key, part, device)
            barrier()
            if rank == 0:
                parts = [path.with_name(f"{path.name}.part{r}of{world}") for r in range(world)]
                self._merge(parts, key, path)
            barrier()
        self.last_build_seconds = time.perf_counter() - start
        return open_entry(path)

    def _usable(self, path: Path, key: dict, may_delete: bool) -> bool:
        """Whether `path` is a complete entry for `key`; a damaged one is reported (and removed)."""
        if not path.exists():
            return False
        problem = verify(path, key)
        if problem is None:
            return True
        log.warning("feature cache entry %s is unusable (%s): rebuilding it", path, problem)
        if may_delete:
            shutil.rmtree(path, ignore_errors=True)
        return False

    def _extract_entry(
        self, encoder: FrozenEncoder, texts: list[str], key: dict, path: Path, device
    ) -> None:
        """Extract `texts` into a new entry at `path`."""
        start = time.perf_counter()
        shape = (len(texts), key["layers"], encoder.hidden_size)
        desc = f"{encoder.spec.key}/{key['split']}" + (
            " shard {}/{}".format(*key["shard"]) if "shard" in key else ""
        )
        self._write_entry(
            path,
            key,
            shape,
            lambda out: extract(encoder, texts, out, self.batch_size, device, desc=desc),
            extra={"compute_reason": encoder.compute_reason(device)},
        )
        seconds = time.perf_counter() - start
        log.info(
            "extracted %s: %d rows in %.1f s (%.0f ex/s) -> %s",
            desc,
            len(texts),
            seconds,
            len(texts) / seconds,
            path,
        )

    def _merge(self, parts: list[Path], key: dict, path: Path) -> None:
        """Interleave the DDP part entries (rows rank::world) into the full entry, then delete them."""
        arrays = [np.load(p / "features.npy", mmap_mode="r", allow_pickle=False) for p in parts]
        shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])

        def fill(out: np.ndarray) -> None:
            for r, a in enumerate(arrays):
                out[r :: len(arrays)] = a

        # the parts were extracted in parallel: the slowest part is the extraction's wall time
        part_seconds = max(read_manifest(p).get("build_seconds", 0.0) for p in parts)
        reason = read_manifest(parts[0]).get("compute_reason")
        self._write_entry(
            path, key, shape, fill, extra_seconds=part_seconds, extra={"compute_reason": reason}
        )
        for p in parts:
            shutil.rmtree(p, ignore_errors=True)

    def _write_entry(
        self,
        path: Path,
        key: dict,
        shape: tuple[int, ...],
        fill: Callable[[np.ndarray], None],
        extra_seconds: float = 0.0,
        extra: dict | None = None,
    ) -> None:
        """Write an entry atomically: fill an array in a temporary directory, checksum it, rename into place.

        The manifest records `build_seconds` (the fill's wall time plus `extra_seconds`): what the entry
        cost to compute, reported by `layerfusion reproduce` even when later runs read it from the cache;
        and `extra` (why the encoder computed in the precision the key names).
        """
        start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        tmp = (
            path.parent
            / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        tmp.mkdir()
        try:
            out = np.lib.format.open_memmap(
                tmp / "features.npy", mode="w+", dtype=self.dtype, shape=shape
            )
            fill(out)
            out.flush()
            del out
            manifest = {
                "key": key,
                "shape": list(shape),
                "dtype": self.dtype,
                "rows": shape[0],
                "sha256": file_sha256(tmp / "features.npy"),
                "build_seconds": time.perf_counter() - start + extra_seconds,
                **(extra or {}),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            try:
                os.rename(tmp, path)
            except OSError:  # another process finished the same entry first
                if verify(path, key) is not None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def extract(
    encoder: FrozenEncoder,
    texts: list[str],
    out: np.ndarray,
    batch_size: int,
    device,
    desc: str = "features",
    sort_by_length: bool = True,
) -> None:
    """Fill `out[i]` with the pooled layers 0..k of `texts[i]` (`out` is `[N, k+1, d]`; the encoder stops
    after layer k), in length-sorted batches (longest first).

    `sort_by_length=False` keeps the given order (only for measuring what bucketing saves).
    """
    tok = encoder.tokenizer
    ids = tok(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
    order = (
        sorted(range(len(texts)), key=lambda i: len(ids[i]), reverse=True)
        if sort_by_length
        else list(range(len(texts)))
    )
    encoder.to(device)
    with _progress() as bar, torch.inference_mode():
        task = bar.add_task(f"extract {desc}", total=len(texts))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tok.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            feats = encoder(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                depth=out.shape[1] - 1,
            )
            out[rows] = feats.cpu().numpy().astype(out.dtype)
            bar.advance(task, len(rows))


def _progress():
    """A rich progress bar with examples/s (drawn on a terminal; the log line after it says the same)."""
    import sys

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


def verify(path: Path, key: dict) -> str | None:
    """None when the entry at `path` is complete and was built from `key`; otherwise what is wrong."""
    manifest_path, array_path = path / "manifest.json", path / "features.npy"
    if not manifest_path.is_file() or not array_path.is_file():
        return "incomplete: manifest or array missing"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"manifest is not valid JSON ({err})"
    if manifest.get("key") != key:
        return "built from other inputs (key mismatch)"
    try:
        array = np.load(array_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        return f"array unreadable ({err})"
    if list(array.shape) != manifest.get("shape") or str(array.dtype) != manifest.get("dtype"):
        return f"array is {array.shape} {array.dtype}, manifest says {manifest.get('shape')} {manifest.get('dtype')}"
    if file_sha256(array_path) != manifest.get("sha256"):
        return "checksum mismatch (file changed or truncated)"
    return None


def read_manifest(path: Path) -> dict:
    """The manifest of the entry at `path` ({} when missing or unreadable)."""
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def open_entry(path: Path) -> torch.Tensor:
    """The cached array, memory-mapped, as a tensor."""
    array = np.load(
        path / "features.npy", mmap_mode="c", allow_pickle=False
    )  # copy-on-write: writable view, file untouched
    return torch.from_numpy(np.asarray(array))


def _remove_leftovers(path: Path) -> None:
    """Delete temporary directories of `path` left by killed processes on this host."""
    for tmp in remove_dead_leftovers(path.parent, f".{path.name}.tmp-{socket.gethostname()}-"):
        log.warning("removing partial feature cache entry left by a killed run: %s", tmp)


def texts_fingerprint(texts: list[str]) -> str:
    """SHA-256 over the texts in order."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe(name: str) -> str:
    return name.replace("/", "__")
