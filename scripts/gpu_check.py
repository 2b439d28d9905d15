"""`make gpu-check`: what extraction and training do on this machine's CUDA card(s), written to
benchmarks/gpu.json with the card's name.

Measures, on CUDA: extraction sentences/s and peak GPU memory per encoder (MiniLM, MPNet) for
`compute_dtype` float32, tfloat32 and bfloat16 (and what `auto` resolves to), after a warm-up and
with `torch.cuda.synchronize` around the timer; the quickstart (4,000 SST-2 rows, 3 epochs) on one GPU
with bf16-mixed, cached and online (1 epoch); DDP and the FSDP preset over every visible GPU (fit, and
a `validate` of the one-GPU checkpoint on 487 rows, a count no GPU count divides, whose val accuracy
must equal the one-GPU figure). Budget: about 8 minutes on one recent GPU.
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
    write_configs(args.run_dir)
    for step, cmd in plan.items():
        results[step] = run_step(cmd)
        name = step.rpartition("_")[0].replace("one_gpu", "cached")
        resources = Path(args.run_dir) / name / "resources.json"  # the ResourceMonitor callback's
        if step.endswith("_fit") and resources.is_file():
            results[step]["resources"] = json.loads(resources.read_text())
        if step.endswith("_validate"):
            results[step]["val_acc"] = val_accuracy(args.run_dir, name)
    one = results["one_gpu_validate"]["val_acc"]
    results["val_acc_equal_to_one_gpu"] = {
        s: one is not None and results[f"{s}_validate"]["val_acc"] == one for s in ("ddp", "fsdp")
    }
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


EVAL_ROWS = 487
"""Validation rows of the check's runs: a prime, so no GPU count (2..8) divides it and the ranks'
shares are uneven (the padding a DistributedSampler would add must not reach the metrics)."""


def commands(run_dir: str) -> dict[str, list[str]]:
    """The CLI runs of the check, each with its own config and run directory under `run_dir`: the
    quickstart on one GPU with bf16-mixed, cached and online; a `validate` of the cached run's
    checkpoint on one GPU, then DDP and the FSDP preset over every visible GPU (fit, and a `validate`
    of that same checkpoint, whose val accuracy must equal the one-GPU figure)."""
    base = [sys.executable, "-m", "layerfusion"]
    run = Path(run_dir)
    ckpt = str(run / "cached" / "checkpoints" / "best.ckpt")

    def cli(stage: str, name: str, trainer: str, *extra: str) -> list[str]:
        config = str(run / f"{name}.yaml")
        return [*base, stage, "--config", config, "--trainer", trainer, *extra]

    gpu, ddp, fsdp = (f"configs/trainer/{p}.yaml" for p in ("gpu", "ddp", "fsdp"))
    return {
        "cached_fit": cli("fit", "cached", gpu),
        "online_fit": cli("fit", "online", gpu, "--model.features", "online"),
        "one_gpu_validate": cli("validate", "cached", gpu, "--ckpt_path", ckpt),
        "ddp_fit": cli("fit", "ddp", ddp),
        "ddp_validate": cli("validate", "ddp", ddp, "--ckpt_path", ckpt),
        "fsdp_fit": cli("fit", "fsdp", fsdp),
        "fsdp_validate": cli("validate", "fsdp", fsdp, "--ckpt_path", ckpt),
    }


def write_configs(run_dir: str, train_rows: int = 4000, epochs: int = 3) -> None:
    """`<run_dir>/{cached,online,ddp,fsdp}.yaml`: the quickstart on `train_rows` SST-2 rows and
    `EVAL_ROWS` validation rows for `epochs` epochs, each writing under `<run_dir>/<name>/`."""
    import yaml

    quick = (REPO / "configs" / "quickstart.yaml").read_text()
    for name in ("cached", "online", "ddp", "fsdp"):
        config = yaml.safe_load(quick.replace("runs/quickstart", f"{run_dir}/{name}"))
        config["data"].update(max_train_samples=train_rows, max_eval_samples=EVAL_ROWS)
        config["trainer"]["max_epochs"] = 1 if name == "online" else epochs
        config["trainer"]["callbacks"] = [
            c for c in config["trainer"]["callbacks"] if "EarlyStopping" not in c["class_path"]
        ]
        path = Path(run_dir) / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))


def val_accuracy(run_dir: str, name: str) -> float | None:
    """The val accuracy RunReport wrote for run `name` (None when it wrote none)."""
    path = Path(run_dir) / name / "metrics_val.json"
    return json.loads(path.read_text()).get("val_acc") if path.is_file() else None


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
