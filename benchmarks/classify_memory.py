"""Peak RSS of the `classify` command on a 10k-row and a 1M-row JSON Lines file: does memory grow with
the file?

    python benchmarks/classify_memory.py [--model tiny|minilm] [--rows SMALL LARGE] [--pad BYTES]
        [--threads N] [--out benchmarks/classify_memory.json]

A classifier folder is written with a gated head (random, seeded: memory does not depend on what the head
learned) over layers 1..2 of a 2-layer, 32-wide random BERT with all-MiniLM-L6-v2's tokenizer (`tiny`,
the default: 1M rows through MiniLM itself take hours on two busy CPU cores) or over layers 4..6 of
MiniLM (`minilm`). Each file holds `rows` SST-2 training sentences (GLUE, drawn with replacement, seeded)
as `{"text": ..., "meta": <pad bytes>}`: the unused `meta` field (default 900 bytes) makes the 1M-row
file about 1 GB, so the reader's memory is measured too. `python -m layerfusion classify FOLDER --file
FILE` runs as a child process (the command's own `main`, in a small wrapper that writes the process's
VmHWM at exit: `ru_maxrss` from `wait4` would report the parent's RSS at the exec when that is higher);
its peak RSS and wall time are reported, with the time to its first output line (streaming: results appear while the file is still
being read) and a check that it printed one line per row. `classify_rss_ratio` = peak RSS at the large
size / at the small size (1.0: flat). The child runs with `--threads` torch threads (OMP_NUM_THREADS,
default 1: on a busy 2-core machine a second thread makes the tiny model's small ops wait for the
scheduler, 3x slower here).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from predict_memory import MINILM, data_file, tiny_model  # noqa: E402

LAYERS = {"minilm": [4, 5, 6], "tiny": [1, 2]}
WRAPPER = """
import atexit, os, sys
from layerfusion.memory import proc_status_bytes
atexit.register(lambda: open(os.environ["CLASSIFY_PEAK_FILE"], "w").write(str(proc_status_bytes("VmHWM"))))
from layerfusion.__main__ import main
main(["classify", *sys.argv[1:]])
"""
"""`python -m layerfusion classify ARGS`, writing its peak RSS (VmHWM, bytes) to $CLASSIFY_PEAK_FILE at exit."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--rows", type=int, nargs=2, default=(10_000, 1_000_000))
    parser.add_argument("--pad", type=int, default=900, help="bytes of the unused field per row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of classify")
    parser.add_argument("--out", default=str(HERE / "classify_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="classify-memory-") as tmp:
        result = bench(Path(tmp), args.model, tuple(args.rows), args.pad, args.threads)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def bench(workdir: Path, model: str, rows: tuple[int, int], pad: int, threads: int = 1) -> dict:
    """Peak RSS, wall time and time to the first result of `classify` at each size, and their ratio."""
    folder = build_classifier(workdir, model)
    runs = {}
    for n in rows:
        path = workdir / f"{n}.jsonl"
        write_rows(path, n, pad)
        runs[n] = {"file_bytes": path.stat().st_size, **run_classify(folder, path, n, threads)}
        path.unlink()
        print(f"{n} rows: {runs[n]}", file=sys.stderr)
    small, large = (runs[n]["peak_rss_bytes"] for n in rows)
    return {
        "classify_rss_ratio": large / small,
        "raw": {
            "rows": list(rows),
            "model": MINILM if model == "minilm" else "tiny random BERT (2 layers, 32 wide)",
            "layers": LAYERS[model],
            "head": "gated (random, seeded), 2 classes",
            "source": f"sst2_glue train sentences, drawn with replacement (seed = rows), "
            f"plus an unused {pad}-byte field per row",
            "measure": "VmHWM of the child process running `layerfusion classify` (at its exit)",
            "runs": {str(n): r for n, r in runs.items()},
            "cpus": os.cpu_count(),
            "torch_threads": threads,
        },
    }


def build_classifier(workdir: Path, model: str) -> Path:
    """A saved classifier folder: a seeded random gated head over the chosen encoder's layers."""
    import torch

    from layerfusion import Classifier
    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.fusion.heads import build_head

    name = MINILM if model == "minilm" else tiny_model(workdir / "tiny-bert")
    spec = EncoderSpec(name, max_length=128, alias="enc", compute_dtype="float32")
    encoder = FrozenEncoder(spec)
    layers = {"enc": LAYERS[model]}
    torch.manual_seed(0)
    head = build_head(
        "gated",
        dims={"enc": encoder.hidden_size},
        num_layers={"enc": encoder.num_layers},
        layers=layers,
        num_classes=2,
        hidden=64,
    )
    config = {
        "format": "layerfusion-classifier",
        "version": 1,
        "label_names": ["negative", "positive"],
        "head": "gated",
        "head_args": {"hidden": 64, "dropout": 0.1},
        "layers": layers,
        "encoders": [asdict(spec)],
        "encoder_ids": {
            "enc": {"weights_sha256": encoder.fingerprint(), "layers": encoder.num_layers}
        },
        "trained": {"note": "random head for benchmarks/classify_memory.py"},
    }
    return Classifier(config, head.state_dict(), device="cpu").save(workdir / "classifier")


def write_rows(path: Path, n: int, pad: int) -> None:
    """`n` SST-2 sentences drawn with replacement (seed `n`), each with an unused `pad`-byte field."""
    texts = [
        json.loads(line)["text"]
        for line in data_file("sst2_glue", "train").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    rng = random.Random(n)
    filler = "x" * pad
    with open(path, "w", encoding="utf-8") as fh:
        for start in range(0, n, 10_000):
            fh.write(
                "".join(
                    json.dumps({"text": rng.choice(texts), "meta": filler}) + "\n"
                    for _ in range(min(10_000, n - start))
                )
            )


def run_classify(folder: Path, path: Path, n: int, threads: int = 1) -> dict:
    """Run `classify` on the file; its peak RSS, wall time, time to first line, lines printed."""
    cmd = [sys.executable, "-c", WRAPPER, str(folder), "--file", str(path), "--device", "cpu"]
    peak_file = path.with_suffix(".peak")
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CLASSIFY_PEAK_FILE": str(peak_file)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO, env=env)
    first, lines = None, 0
    for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
        if first is None:
            first = time.perf_counter() - start
        lines += chunk.count(b"\n")
    code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0 or lines != n:
        raise SystemExit(f"classify failed on {path}: exit {code}, {lines} of {n} lines")
    return {
        "peak_rss_bytes": int(peak_file.read_text()),
        "wall_seconds": round(wall, 1),
        "first_result_seconds": round(first, 1),
        "rows_per_second": round(n / wall),
    }


if __name__ == "__main__":
    main()
