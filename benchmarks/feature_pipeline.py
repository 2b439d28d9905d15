"""Importance-ready features of every layer + per-layer probes: layerfusion vs the reference workflow."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from benchutil import Sizes, clocked, log, median, sst2_slice
from reference_pipeline import layer_file, reference_pipeline, train_probe

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder, load_pretrained
from layerfusion.features.cache import FeatureCache

SEQUENCE = ("layerfusion", "reference", "layerfusion")
"""Run order: one reference run (minutes) bracketed by two layerfusion runs."""


def bench_reference_pipeline(sizes: Sizes, device: str, workdir: Path) -> dict:
    """`reference_pipeline_speedup` = reference time / layerfusion time, features and probes both."""
    texts, labels = sst2_slice(sizes.pipeline_texts, seed=2)
    # fp32 like the reference (`auto` would pick bf16 on a CPU with bf16 units)
    specs = {
        s.key: s
        for s in (
            EncoderSpec(m, max_length=sizes.max_length, compute_dtype="float32")
            for m in sizes.models
        )
    }
    loaded = {}
    for key, spec in specs.items():
        model, tokenizer = load_pretrained(spec)
        loaded[key] = (model.to(device).eval(), tokenizer)
    times: dict[str, list[float]] = {"layerfusion": [], "reference": []}
    results: dict[str, dict] = {}
    for i, name in enumerate(SEQUENCE):
        out = workdir / f"{name}-{i}"
        out.mkdir(parents=True)
        if name == "layerfusion":
            args = (specs, loaded, texts, labels, out, sizes.batch_size, sizes.probe_epochs, device)
            pipeline = layerfusion_pipeline
        else:
            args = (
                loaded,
                texts,
                labels,
                out,
                sizes.batch_size,
                sizes.max_length,
                sizes.probe_epochs,
            )
            pipeline = reference_pipeline
        accuracies, seconds = clocked(partial(pipeline, *args), device)
        results[name] = {"dir": out, "acc": accuracies}
        times[name].append(seconds)
        log(f"pipeline {name}: {seconds:.1f}s")
    lf, ref = results["layerfusion"], results["reference"]
    return {
        "reference_pipeline_speedup": median(times["reference"]) / median(times["layerfusion"]),
        "raw": {
            "models": list(specs),
            "texts": len(texts),
            "batch_size": sizes.batch_size,
            "probe_epochs": sizes.probe_epochs,
            "extraction_passes": {
                "reference": sum(m.config.num_hidden_layers + 1 for m, _ in loaded.values()),
                "layerfusion": len(loaded),
            },
            "order": list(SEQUENCE),
            "seconds": times,
            "probe_accuracy": {"layerfusion": lf["acc"], "reference": ref["acc"]},
            "max_abs_feature_diff": feature_diff(specs, lf["dir"], ref["dir"]),
        },
    }


def layerfusion_pipeline(
    specs: dict[str, EncoderSpec],
    loaded: dict[str, tuple],
    texts: list[str],
    labels: list[int],
    cache_root: Path,
    batch_size: int,
    probe_epochs: int,
    device: str,
) -> dict[str, list[float]]:
    """One cached pass per encoder (empty cache), then the same per-layer probes on the cached tensors."""
    cache = FeatureCache(cache_root, dtype="float32", batch_size=batch_size)
    y = torch.tensor(labels)
    accuracies = {}
    for key, (model, tokenizer) in loaded.items():
        encoder = FrozenEncoder(specs[key], model, tokenizer)  # fresh: weight hashing is timed too
        try:
            features = cache.load_or_build(encoder, texts, "train", device)
        finally:
            encoder.close()
        accuracies[key] = [
            train_probe(features[:, layer], y, probe_epochs) for layer in range(features.shape[1])
        ]
    return accuracies


def feature_diff(specs: dict[str, EncoderSpec], lf_dir: Path, ref_dir: Path) -> dict[str, float]:
    """Largest difference between layerfusion's cached features and the reference's saved ones."""
    from layerfusion.features.cache import open_entry

    diffs = {}
    for key in specs:
        cached = [p.parent for p in lf_dir.rglob("manifest.json") if key in str(p)]
        array = open_entry(cached[0])[:]
        diffs[key] = max(
            (array[:, layer] - torch.load(layer_file(ref_dir, key, layer))).abs().max().item()
            for layer in range(array.shape[1])
        )
    return diffs
