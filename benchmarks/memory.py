"""Peak memory of tapped extraction vs a bare forward and vs `output_hidden_states=True`, each variant in
a fresh process.

Run as a script (`python benchmarks/memory.py '<json args>'`) it is the worker: it loads the model,
records the resident memory, resets the peak, runs one forward of the variant and prints the peak.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchutil import Sizes, data_dir, log, median

VARIANTS = ("tapped", "hidden_states", "plain")
"""`plain` (no hooks, no hidden states) is the floor: what the model's own forward needs."""


def bench_hidden_states_memory(sizes: Sizes, device: str, threads: int) -> dict:
    """`tap_memory_overhead` = peak growth of a tapped forward / of a bare forward (no hooks, no hidden
    states); `hidden_states_memory_ratio` = peak growth of tapped pooling / of keeping `hidden_states`."""
    texts = long_documents(sizes.big, sizes.memory_batch, sizes.memory_length)
    with tempfile.TemporaryDirectory(prefix="lf-bench-mem-") as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(sizes.memory_rounds):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                args = {
                    "variant": variant,
                    "model": sizes.big,
                    "length": sizes.memory_length,
                    "texts_file": str(texts_file),
                    "device": device,
                    "threads": threads,
                }
                result = run_worker(args)
                runs[variant].append(result)
                log(
                    f"memory {variant}: +{result['growth_bytes'] / 2**20:.0f} MiB above the loaded model"
                )
    growth = {v: median([run["growth_bytes"] for run in rs]) for v, rs in runs.items()}
    return {
        "tap_memory_overhead": growth["tapped"] / growth["plain"],
        "hidden_states_memory_ratio": growth["tapped"] / growth["hidden_states"],
        "raw": {
            "plain_over_hidden_states": growth["plain"] / growth["hidden_states"],
            "model": sizes.big,
            "batch": sizes.memory_batch,
            "tokens": sizes.memory_length,
            "source": "r8 train documents with at least `tokens` tokens, seeded sample",
            "growth_mib": {v: g / 2**20 for v, g in growth.items()},
            "runs": runs,
            "parent_rss_mib": current_rss() / 2**20,
        },
    }


def long_documents(model: str, n: int, length: int) -> list[str]:
    """A seeded sample of `n` R8 training documents that have at least `length` tokens."""
    from layerfusion.data.readers import read_jsonl
    from layerfusion.encoders.frozen import EncoderSpec, load_tokenizer

    texts = read_jsonl(data_dir() / "r8" / "train.jsonl").texts
    tokenizer = load_tokenizer(EncoderSpec(model))
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    long = [t for t, k in zip(texts, lengths) if k >= length]
    if len(long) < n:
        raise RuntimeError(
            f"r8 train has only {len(long)} documents of >= {length} tokens, need {n}"
        )
    return random.Random(0).sample(long, n)


def run_worker(args: dict) -> dict:
    """Run one variant in a fresh process and return its measurements.

    The worker is started through `sh` (which forks it) so that its `ru_maxrss` does not inherit
    this process's peak: Linux copies the parent's peak into a child that execs right after vfork.
    """
    cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, __file__, json.dumps(args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {args['variant']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(args: dict) -> dict:
    """Load the model, run one forward of `args['variant']`, return the peak growth above the loaded model."""
    import torch

    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.memory import proc_status_bytes, reset_peak_rss

    torch.set_num_threads(args["threads"])
    device = args["device"]
    cuda = device.startswith("cuda")
    spec = EncoderSpec(args["model"], max_length=args["length"], compute_dtype="float32")
    encoder = FrozenEncoder(spec).to(device)  # fp32 like the bare forward it is compared with
    if args["variant"] != "tapped":
        encoder.close()  # a bare model, no hooks
    texts = json.loads(Path(args["texts_file"]).read_text())
    batch = encoder.tokenizer(
        texts, truncation=True, max_length=args["length"], padding=True, return_tensors="pt"
    ).to(device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # warm-up on a tiny input: pages in kernels and allocator pools, which are no feature memory
    forward_variant(encoder, args["variant"], ids[:2, :16], mask[:2, :16])
    gc.collect()
    _malloc_trim()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss()
        loaded_peak = _maxrss()
        reset = reset_peak_rss()
    pooled = forward_variant(encoder, args["variant"], ids, mask)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        extra = {"measure": "cuda max_memory_allocated"}
    else:
        peak = _maxrss()
        extra = {
            "measure": "ru_maxrss",
            "peak_reset_after_load": reset,
            "load_peak_bytes": loaded_peak,
            "vm_hwm_bytes": proc_status_bytes("VmHWM"),
        }
    return {
        "variant": args["variant"],
        "shape": list(ids.shape),
        "pooled_shape": list(pooled.shape),
        "base_bytes": base,
        "peak_bytes": peak,
        "growth_bytes": peak - base,
        **extra,
    }


def forward_variant(encoder, variant: str, ids, mask):
    """Pooled layers `[B, L, d]` by the taps or from the kept `hidden_states` tuple; or the bare forward."""
    import torch

    from layerfusion.encoders.taps import pool

    with torch.inference_mode():
        if variant == "tapped":
            return encoder(ids, mask)
        if variant == "plain":
            return encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = encoder.model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states
        return torch.stack([pool(h, mask, "mean") for h in hidden], dim=1)


def current_rss() -> int:
    """Resident memory of this process now, in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    """`ru_maxrss` in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so the baseline is what the model really holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
