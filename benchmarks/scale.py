"""Corpus scale: selected-layer vs all-layer cache entries, and token-budget vs fixed-row extraction batches.

(a) An SST-2 slice through `FeatureCache` twice per round, into empty caches: every layer, and a selection
    ending at layer 8 of MPNet (layer 4 of MiniLM in quick mode), extracted with early exit and stored
    alone: disk and time ratios. (b) Peak RSS of extracting R8 documents of >= 512 tokens (128 in quick
    mode) with every layer, in a fresh process per variant: fixed batches of 64 rows (the old default)
    against token budgets. (c) Extraction time of the SST-2 slice for the same variants (the cost of the
    budget on short texts).

Run as a script (`python benchmarks/scale.py '<json args>'`) it is the RSS worker of (b).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from benchutil import MINILM, MPNET, Sizes, alternate, log, median, round_ratios, sst2_slice, timed

FIXED_ROWS = 64
"""The fixed extraction batch of layerfusion before token budgets."""


@dataclass(frozen=True)
class ScaleSizes:
    model: str
    selection: tuple[int, ...]
    """Selected layers (hidden-state indices) of the disk/time comparison; the last one is the exit."""
    texts: int
    """SST-2 sentences of (a) and (c)."""
    max_length: int
    rounds: int
    """Rounds of (a) and (c); (b) runs each variant once (peak memory is not what load disturbs)."""
    docs: int
    """R8 documents of (b): one batch of the fixed 64 rows."""
    doc_length: int
    budgets: tuple[int, ...]
    """Token budgets of (b) and (c); the default `TOKEN_BUDGET` is among them."""


FULL = ScaleSizes(MPNET, (2, 5, 8), 256, 128, 2, 64, 512, (4096, 8192, 16384))
QUICK = ScaleSizes(MINILM, (1, 2, 4), 48, 64, 1, 16, 128, (1024, 4096))


def bench_scale(sizes: Sizes, device: str, threads: int, workdir: Path) -> dict:
    """`selected_layers_disk_ratio`, `selected_layers_time_ratio` (all-layer / selected), and
    `token_budget_rss_ratio`, `token_budget_sst2_time_ratio` (fixed 64 rows / default budget)."""
    from layerfusion.features.cache import TOKEN_BUDGET

    s = QUICK if sizes.quick else FULL
    if TOKEN_BUDGET not in s.budgets:
        raise RuntimeError(f"the default token budget {TOKEN_BUDGET} is not among {s.budgets}")
    layers = _selected_layers(s, device, workdir)
    rss = _peak_rss(s, device, threads)
    speed = _sst2_speed(s, device)
    default = f"budget_{TOKEN_BUDGET}"
    rss_ratio = rss["growth_mib"]["rows_64"] / rss["growth_mib"][default]
    speed_ratio = median(round_ratios(speed["seconds"]["rows_64"], speed["seconds"][default]))
    log(
        f"scale: selected layers disk x{layers['disk_ratio']:.2f}, time x{layers['time_ratio']:.2f}; "
        f"token budget {TOKEN_BUDGET}: peak RSS growth x{rss_ratio:.2f} smaller, SST-2 time ratio "
        f"{speed_ratio:.2f} (fixed 64 rows / budget)"
    )
    return {
        "selected_layers_disk_ratio": layers.pop("disk_ratio"),
        "selected_layers_time_ratio": layers.pop("time_ratio"),
        "token_budget_rss_ratio": rss_ratio,
        "token_budget_sst2_time_ratio": speed_ratio,
        "raw": {
            "default_token_budget": TOKEN_BUDGET,
            "selected_layers": layers,
            "peak_rss": rss,
            "sst2_speed": speed,
        },
    }


def _selected_layers(s: ScaleSizes, device: str, workdir: Path) -> dict:
    """(a): all-layer vs selected-layer entries of the same SST-2 slice, into empty caches, alternated."""
    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.features.cache import FeatureCache

    texts, _ = sst2_slice(s.texts, seed=11)
    encoder = FrozenEncoder(EncoderSpec(s.model, max_length=s.max_length)).to(device)
    variants = {"all": None, "selected": list(s.selection)}
    sizes: dict[str, int] = {}
    feats: dict[str, object] = {}
    counter = iter(range(10**6))

    def run(name: str) -> float:
        cache = FeatureCache(workdir / f"scale-{name}-{next(counter)}")
        seconds = timed(
            lambda: feats.__setitem__(
                name, cache.load_or_build(encoder, texts, "train", device, variants[name])
            ),
            device,
        )
        (manifest,) = cache.root.rglob("manifest.json")
        sizes[name] = sum(f.stat().st_size for f in manifest.parent.iterdir())
        log(f"scale: {name} layers {seconds:.1f}s, {sizes[name] / 2**20:.2f} MiB")
        return seconds

    times = alternate({v: partial(run, v) for v in variants}, s.rounds)
    ratios = round_ratios(times["all"], times["selected"])
    diff = (feats["all"][:, list(s.selection)].float() - feats["selected"][:].float()).abs().max()
    encoder.close()
    return {
        "disk_ratio": sizes["all"] / sizes["selected"],
        "time_ratio": median(ratios),
        "model": s.model,
        "layers": encoder.num_layers,
        "selection": list(s.selection),
        "texts": len(texts),
        "max_length": s.max_length,
        "entry_bytes": sizes,
        "seconds": times,
        "round_ratios": ratios,
        "max_abs_diff_vs_all_layer_slice": float(diff),
    }


def _peak_rss(s: ScaleSizes, device: str, threads: int) -> dict:
    """(b): peak RSS growth of all-layer extraction of long R8 documents, one fresh process per variant
    (single runs: the peak depends on the largest batch, not on other load)."""
    from memory import long_documents

    texts = long_documents(s.model, s.docs, s.doc_length)
    variants = {"rows_64": (None, FIXED_ROWS), **{f"budget_{b}": (b, None) for b in s.budgets}}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lf-bench-scale-") as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        for name, (budget, rows) in variants.items():
            args = {
                "model": s.model,
                "length": s.doc_length,
                "texts_file": str(texts_file),
                "token_budget": budget,
                "max_rows": rows,
                "device": device,
                "threads": threads,
            }
            runs[name] = _run_worker(args)
            log(
                f"scale rss {name}: +{runs[name]['growth_bytes'] / 2**20:.0f} MiB, "
                f"{runs[name]['seconds']:.1f}s, largest batch {runs[name]['largest_batch']} tokens"
            )
    return {
        "growth_mib": {v: r["growth_bytes"] / 2**20 for v, r in runs.items()},
        "model": s.model,
        "docs": len(texts),
        "tokens": s.doc_length,
        "source": "r8 train documents with at least `tokens` tokens, seeded sample",
        "runs": runs,
    }


def _sst2_speed(s: ScaleSizes, device: str) -> dict:
    """(c): extraction time of every layer of the SST-2 slice, fixed 64 rows vs each token budget."""
    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.features.cache import extract_chunk

    texts, _ = sst2_slice(s.texts, seed=12)
    encoder = FrozenEncoder(EncoderSpec(s.model, max_length=s.max_length)).to(device)
    every = list(range(encoder.num_layers))
    variants = {"rows_64": (None, FIXED_ROWS), **{f"budget_{b}": (b, None) for b in s.budgets}}

    def run(name: str) -> float:
        budget, rows = variants[name]
        return timed(lambda: extract_chunk(encoder, texts, every, device, budget, rows), device)

    run("rows_64")  # warm-up
    times = alternate({v: partial(run, v) for v in variants}, s.rounds)
    encoder.close()
    return {"model": s.model, "texts": len(texts), "max_length": s.max_length, "seconds": times}


def _run_worker(args: dict) -> dict:
    """The RSS worker in a fresh process, started through `sh` so that its peak is not the parent's."""
    cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, __file__, json.dumps(args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"scale RSS worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(args: dict) -> dict:
    """Load the model, extract every layer of the texts with one batching variant; the peak RSS growth
    above the loaded model (after a tiny warm-up forward)."""
    import torch
    from memory import _malloc_trim, current_rss

    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.features.cache import extract_chunk, token_batches
    from layerfusion.memory import proc_status_bytes, reset_peak_rss

    torch.set_num_threads(args["threads"])
    encoder = FrozenEncoder(EncoderSpec(args["model"], max_length=args["length"]))
    texts = json.loads(Path(args["texts_file"]).read_text())
    every = list(range(encoder.num_layers))
    extract_chunk(encoder, [t[:80] for t in texts[:2]], every, args["device"], None, None)
    gc.collect()
    _malloc_trim()
    base = current_rss()
    reset = reset_peak_rss()
    seconds = timed(
        lambda: extract_chunk(
            encoder, texts, every, args["device"], args["token_budget"], args["max_rows"]
        ),
        args["device"],
    )
    peak = proc_status_bytes("VmHWM")
    lengths = [
        len(i)
        for i in encoder.tokenizer(texts, truncation=True, max_length=args["length"])["input_ids"]
    ]
    batches = token_batches(lengths, args["token_budget"], args["max_rows"])
    largest = max(len(b) * max(lengths[i] for i in b) for b in batches)
    return {
        "base_bytes": base,
        "peak_bytes": peak,
        "growth_bytes": peak - base,
        "peak_reset": reset,
        "seconds": seconds,
        "batches": len(batches),
        "largest_batch": largest,
        "compute_dtype": encoder.compute_precision(args["device"]),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(worker(json.loads(sys.argv[1]))))
