"""bf16 vs fp32 extraction: throughput of the big encoder on SST-2 sentences and R8 documents, and the
per-layer dev accuracy of linear probes trained on each precision's features (both encoders, SST-2, R8)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from benchutil import Sizes, alternate, data_dir, log, median, round_ratios, sst2_slice
from bucketing import extraction_seconds
from memory import long_documents

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder, load_pretrained
from layerfusion.features.cache import extract
from layerfusion.importance.probes import probe_accuracy

PRECISIONS = ("float32", "bfloat16")


def bench_bf16_extract(sizes: Sizes, device: str) -> dict:
    """`bf16_extract_speedup` = fp32 extraction time / bf16 extraction time (the lower of SST-2 and R8)."""
    model, tokenizer = load_pretrained(EncoderSpec(sizes.big))
    model.to(device).eval()
    by_data, raw = {}, {}
    for dataset, n in sizes.precision_texts.items():
        length = sizes.precision_lengths[dataset]
        texts = (
            sst2_slice(n, seed=7)[0] if dataset == "sst2" else long_documents(sizes.big, n, length)
        )
        encoders = {
            p: FrozenEncoder(
                EncoderSpec(sizes.big, max_length=length, compute_dtype=p), model, tokenizer
            )
            for p in PRECISIONS
        }
        outs = {
            p: np.empty((n, e.num_layers, e.hidden_size), np.float32) for p, e in encoders.items()
        }

        runs = {
            p: partial(extraction_seconds, e, texts, outs[p], sizes.batch_size, device, True)
            for p, e in encoders.items()
        }
        for run in runs.values():  # warm-up
            run(rows=min(n, sizes.batch_size))
        times = alternate(runs, sizes.precision_rounds)
        ratios = round_ratios(times["float32"], times["bfloat16"])
        by_data[dataset] = median(ratios)
        cos = torch.nn.functional.cosine_similarity(
            torch.from_numpy(outs["float32"]), torch.from_numpy(outs["bfloat16"]), dim=-1
        )
        raw[dataset] = {
            "texts": n,
            "max_length": length,
            "seconds": times,
            "round_ratios": ratios,
            "texts_per_second": {p: n / median(t) for p, t in times.items()},
            "min_cosine_per_layer": cos.min(0).values.tolist(),
            "max_abs_diff": float(np.abs(outs["float32"] - outs["bfloat16"]).max()),
        }
        for e in encoders.values():
            e.close()
        log(f"bf16 extraction {dataset}: x{by_data[dataset]:.2f} ({times})")
    return {
        "bf16_extract_speedup": min(by_data.values()),
        "bf16_extract_speedup_by_data": by_data,
        "raw": {"model": sizes.big, "batch_size": sizes.batch_size, **raw},
    }


def bench_bf16_probe_parity(sizes: Sizes, device: str) -> dict:
    """`bf16_probe_max_diff_points` = largest |bf16 - fp32| per-layer dev probe accuracy, in points."""
    accuracy: dict[str, dict[str, dict[str, list[float]]]] = {}
    cosine: dict[str, dict[str, list[float]]] = {}
    for dataset, (n_train, n_dev) in sizes.parity_rows.items():
        length = sizes.precision_lengths[dataset]
        dm = TextClassificationDataModule(
            dataset,
            data_dir=str(data_dir()),
            max_train_samples=n_train,
            max_eval_samples=n_dev,
        )
        dm.setup("fit")
        texts = {s: dm.texts(s) for s in ("train", "val")}
        labels = {s: torch.tensor(dm.label_ids(s)) for s in ("train", "val")}
        accuracy[dataset], cosine[dataset] = {}, {}
        for name in sizes.models:
            model, tokenizer = load_pretrained(EncoderSpec(name))
            model.to(device).eval()
            feats = {}
            for p in PRECISIONS:
                encoder = FrozenEncoder(
                    EncoderSpec(name, max_length=length, compute_dtype=p), model, tokenizer
                )
                feats[p] = {}
                for split, rows in texts.items():
                    out = np.empty((len(rows), encoder.num_layers, encoder.hidden_size), np.float32)
                    extract(encoder, rows, out, sizes.batch_size, device)
                    feats[p][split] = torch.from_numpy(out)
                encoder.close()
            key = EncoderSpec(name).key
            accuracy[dataset][key] = {
                p: [
                    probe_accuracy(
                        f["train"][:, layer],
                        labels["train"],
                        f["val"][:, layer],
                        labels["val"],
                        len(dm.label_names),
                    )
                    for layer in range(f["train"].shape[1])
                ]
                for p, f in feats.items()
            }
            cos = torch.nn.functional.cosine_similarity(
                feats["float32"]["val"], feats["bfloat16"]["val"], dim=-1
            )
            cosine[dataset][key] = cos.min(0).values.tolist()
            log(f"bf16 probe parity {dataset} {key}: {accuracy[dataset][key]}")
    diffs = [
        abs(a - b) * 100
        for by_model in accuracy.values()
        for acc in by_model.values()
        for a, b in zip(acc["float32"], acc["bfloat16"], strict=True)
    ]
    return {
        "bf16_probe_max_diff_points": max(diffs),
        "raw": {
            "rows": {d: {"train": t, "dev": v} for d, (t, v) in sizes.parity_rows.items()},
            "max_length": sizes.precision_lengths,
            "probe": "layerfusion.importance.probes.probe_accuracy (L-BFGS linear probe, z-scored)",
            "probe_accuracy": accuracy,
            "min_dev_cosine_per_layer": cosine,
        },
    }
