"""Read back what an offline W&B run wrote: the records of its `.wandb` transaction log.

The log uses LevelDB's record framing (32 KiB blocks; each record: CRC32C, length, type) after a
7-byte `:W&B` header; the payloads are `wandb_internal_pb2.Record` protobufs. wandb 0.31 has no
Python reader for it any more (its core is in Go), so the tests carry this small one.
"""

from __future__ import annotations

import json
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_run(run_dir: Path, wait: float = 60.0) -> dict:
    """`{"history": {key: [values]}, "summary": {...}, "config": {...}, "kinds": {record type: count}}`.

    W&B's service process may still be writing the log when the run's own process has exited: wait up
    to `wait` seconds for the run's final (`exit`) record."""
    import time

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait
    while True:
        try:
            out = _read(run_dir)
            if "exit" in out["kinds"]:
                return out
        except (ValueError, DecodeError):  # not written yet (empty, a partial header or record)
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read(run_dir: Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = list(Path(run_dir).glob("*.wandb"))
    out: dict = {"history": {}, "summary": {}, "config": {}, "kinds": {}}
    for payload in _payloads(log.read_bytes()):
        rec = pb.Record.FromString(payload)
        kind = rec.WhichOneof("record_type")
        out["kinds"][kind] = out["kinds"].get(kind, 0) + 1
        if kind == "history":
            for item in rec.history.item:
                out["history"].setdefault(_key(item), []).append(json.loads(item.value_json))
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _payloads(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
        elif kind == 0 and length == 0:
            pos += left - 7  # zero padding to the end of the block
    return out
