"""The process group the feature cache runs in (a Lightning strategy, Fabric, or one process): rank 0
decides and every rank learns the outcome; a failure on any rank is raised on every rank, so none is left
waiting in a collective."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from layerfusion.errors import LayerFusionError
from layerfusion.features.entry import CachedFeatures, FeatureCacheError, open_entry


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


def on_rank_zero(dist: Distributed, decide: Callable[[], tuple]) -> tuple:
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


def open_on_every_rank(dist: Distributed, path: Path) -> CachedFeatures:
    """`open_entry(path)` on every rank; a failure on any rank (e.g. NFS not yet showing rank 0's fresh
    manifest) is raised on every rank, naming the rank, instead of leaving the others in a collective."""
    try:
        entry, message = open_entry(path), None
    except Exception as err:
        if dist.world_size == 1:
            raise
        entry = None
        message = str(err) if isinstance(err, LayerFusionError) else f"{type(err).__name__}: {err}"
    messages = [dist.broadcast(message, src=r) for r in range(dist.world_size)]
    for r, m in enumerate(messages):
        if m is not None:
            raise FeatureCacheError(f"feature cache entry cannot be opened on rank {r}: {m}")
    return entry
