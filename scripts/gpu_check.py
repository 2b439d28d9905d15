"""`make gpu-check`: what extraction and training do on this machine's CUDA card(s), written to
benchmarks/gpu.json with the card's name.

Measures, on CUDA: extraction sentences/s and peak GPU memory per encoder (MiniLM, MPNet) for
`compute_dtype` float32, tfloat32 and bfloat16 (and what `auto` resolves to); the quickstart
(`fit` + `test`) with the gpu trainer preset; a DDP `fit` of the quickstart over every visible GPU.
Without CUDA it says so and exits 0; `--dry-run` prints the plan instead of running it.
Not part of `make test` (the suite runs its CPU-safe parts: `tests/test_gpu_check.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ENCODERS = ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-mpnet-base-v2")
PRECISIONS = ("float32", "tfloat32", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    """Run the checks (or print the plan) and write the JSON; 0 when there is no CUDA device."""
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    plan = commands(args.run_dir)
    if args.dry_run:
        print(f"gpu-check plan (CUDA {'available' if cuda else 'not available'}):")
        print(
            f"  extraction: {', '.join(ENCODERS)} x {', '.join(PRECISIONS)}, {args.texts} sentences"
        )
        for name, cmd in plan.items():
            print(f"  {name}: {' '.join(cmd)}")
        print(f"  results -> {args.out}")
        return 0
    if not cuda:
        print(
            f"gpu-check: no CUDA device visible (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); nothing measured, {args.out} left as it is"
        )
        return 0
    results = {"card": card_info(), "torch_version": torch.__version__, "extraction": {}}
    texts = sst2_sentences(args.texts)
    for name in ENCODERS:
        results["extraction"][name] = measure_extraction(name, texts, "cuda", PRECISIONS)
    for step, cmd in plan.items():
        results[step] = run_step(cmd)
    for step, directory in (
        ("quickstart_fit", REPO / "runs" / "quickstart"),
        ("ddp_fit", Path(args.run_dir) / "ddp"),
    ):
        resources = directory / "resources.json"  # written by the ResourceMonitor callback
        if resources.is_file():
            results[step]["resources"] = json.loads(resources.read_text())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["extraction"], indent=1))
    print(f"written to {args.out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "gpu.json"))
    parser.add_argument("--texts", type=int, default=2048, help="SST-2 sentences per extraction")
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "gpu-check"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    return parser.parse_args(argv)


def commands(run_dir: str) -> dict[str, list[str]]:
    """The CLI runs of the check: quickstart on one GPU (fit, test), DDP fit over every visible GPU."""
    base = [sys.executable, "-m", "layerfusion"]
    quick = ["--config", "configs/quickstart.yaml"]
    gpu = [*quick, "--trainer", "configs/trainer/gpu.yaml"]
    ddp = [*quick, "--trainer", "configs/trainer/ddp.yaml"]
    return {
        "quickstart_fit": [*base, "fit", *gpu],
        "quickstart_test": [
            *base,
            "test",
            *gpu,
            "--ckpt_path",
            "runs/quickstart/checkpoints/best.ckpt",
        ],
        "ddp_fit": [*base, "fit", *ddp, "--trainer.default_root_dir", f"{run_dir}/ddp"],
    }


def card_info() -> dict:
    """Name, count, compute capability, memory and bf16 support of the visible CUDA cards."""
    props = torch.cuda.get_device_properties(0)
    return {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_gib": props.total_memory / 2**30,
        "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
        "cuda_build": torch.version.cuda,
    }


def sst2_sentences(n: int) -> list[str]:
    """`n` SST-2 training sentences (all of them when fewer), in file order."""
    from layerfusion.data.datamodule import TextClassificationDataModule

    dm = TextClassificationDataModule("sst2", max_train_samples=n, max_eval_samples=1)
    dm.setup("fit")
    return dm.texts("train")


def measure_extraction(name: str, texts: list[str], device: str, precisions=PRECISIONS) -> dict:
    """Per compute precision: sentences/s of `extract` over `texts` (after a warm-up batch), the peak
    GPU memory (CUDA), the precision it resolved to, and the largest difference to the first one."""
    import numpy as np

    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder, load_pretrained
    from layerfusion.features.cache import extract

    model, tokenizer = load_pretrained(EncoderSpec(name))
    model.to(device).eval()
    out: dict[str, dict] = {}
    reference = None
    for precision in [*precisions, "auto"]:
        encoder = FrozenEncoder(
            EncoderSpec(name, compute_dtype=precision), model=model, tokenizer=tokenizer
        )
        feats = np.empty((len(texts), encoder.num_layers, encoder.hidden_size), np.float32)
        extract(encoder, texts[:64], feats[:64], 64, device)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        extract(encoder, texts, feats, 64, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        entry = {
            "resolved": encoder.compute_precision(device),
            "reason": encoder.compute_reason(device),
            "sentences_per_second": len(texts) / seconds,
            "seconds": seconds,
        }
        if device.startswith("cuda"):
            entry["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if reference is None:
            reference = feats.copy()
        entry["max_abs_diff_to_" + precisions[0]] = float(np.abs(feats - reference).max())
        out[precision] = entry
        encoder.close()
    return out


def run_step(cmd: list[str]) -> dict:
    """Run one CLI step from the repository root; its wall time, exit status and the tail of its output."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    return {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "wall_seconds": time.perf_counter() - start,
        "output_tail": (proc.stdout + proc.stderr)[-2000:],
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
