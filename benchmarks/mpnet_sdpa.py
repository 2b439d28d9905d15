"""MPNet's eager attention vs the same attention through `scaled_dot_product_attention` with its relative
position bias (plus the padding mask) passed as a float mask (`layerfusion.encoders.frozen.set_mpnet_sdpa`):
speed and largest feature difference.

transformers 5 runs MPNet with eager attention only. layerfusion uses the SDPA path because this measured
it faster and within 1e-4 of eager (see benchmarks/README.md); this benchmark keeps checking that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from benchutil import Sizes, log, median, round_ratios, sst2_slice, timed
from memory import long_documents

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder, load_pretrained, set_mpnet_sdpa

TOLERANCE = 1e-4
"""Largest absolute difference of pooled features that adoption would accept."""


def bench_mpnet_sdpa(sizes: Sizes, device: str) -> dict:
    """`mpnet_sdpa_speedup` = eager time / SDPA time (tapped forwards, batch by batch, ABBA; the lower of
    SST-2 sentences and R8 documents); `mpnet_sdpa_max_abs_diff` = largest difference of any pooled layer."""
    model, tokenizer = mpnet(sizes)
    model.to(device).eval()
    by_data, diffs, raw = {}, {}, {}
    for dataset, length in sizes.precision_lengths.items():
        n = sizes.tap_texts if dataset == "sst2" else max(sizes.batch_size, sizes.tap_texts // 4)
        texts = (
            sst2_slice(n, seed=4)[0] if dataset == "sst2" else long_documents(sizes.big, n, length)
        )
        spec = EncoderSpec(sizes.sdpa_model or "mpnet", max_length=length, compute_dtype="float32")
        encoder = FrozenEncoder(spec, model, tokenizer)
        by_data[dataset], diffs[dataset], raw[dataset] = _compare(encoder, texts, sizes, device)
        encoder.close()
        log(f"mpnet sdpa {dataset}: x{by_data[dataset]:.3f}, max diff {diffs[dataset]:.2e}")
    speedup, diff = min(by_data.values()), max(diffs.values())
    return {
        "mpnet_sdpa_speedup": speedup,
        "mpnet_sdpa_max_abs_diff": diff,
        "raw": {
            "model": sizes.sdpa_model or "tiny random MPNet (quick mode)",
            "batch_size": sizes.batch_size,
            "speedup_by_data": by_data,
            "max_abs_diff_by_data": diffs,
            **raw,
            "adopt": bool(speedup > 1.0 and diff <= TOLERANCE),
            "tolerance": TOLERANCE,
        },
    }


def _compare(encoder: FrozenEncoder, texts: list[str], sizes: Sizes, device: str):
    """(median eager/SDPA time ratio, largest feature difference, raw figures) over `texts`."""
    tokenizer = encoder.tokenizer
    batches = [
        tokenizer(
            texts[i : i + sizes.batch_size],
            truncation=True,
            max_length=encoder.max_length,
            padding=True,
            return_tensors="pt",
        ).to(device)
        for i in range(0, len(texts), sizes.batch_size)
    ]

    def run(variant: str, batch) -> tuple[torch.Tensor, float]:
        with sdpa_attention(encoder.model, variant == "sdpa"), torch.inference_mode():
            out: list[torch.Tensor] = []
            seconds = timed(
                lambda: out.append(encoder(batch["input_ids"], batch["attention_mask"])), device
            )
        return out[0], seconds

    diff = max((run("eager", b)[0] - run("sdpa", b)[0]).abs().max().item() for b in batches)
    times: dict[str, list[float]] = {"eager": [], "sdpa": []}
    for r in range(sizes.tap_rounds):
        spent = {"eager": 0.0, "sdpa": 0.0}
        for b, batch in enumerate(batches):
            for name in ("eager", "sdpa") if (r + b) % 2 == 0 else ("sdpa", "eager"):
                spent[name] += run(name, batch)[1]
        for name in spent:
            times[name].append(spent[name])
    ratios = round_ratios(times["eager"], times["sdpa"])
    shape = [len(texts), int(batches[0]["input_ids"].shape[1])]
    return (
        median(ratios),
        diff,
        {"texts_and_longest": shape, "seconds": times, "round_ratios": ratios},
    )


def mpnet(sizes: Sizes):
    """The real MPNet of the full mode, or (quick mode, where only MiniLM is installed) a tiny random one
    with MiniLM's tokenizer: the quick mode checks the code and the numerics, not the speed."""
    if sizes.sdpa_model:
        return load_pretrained(EncoderSpec(sizes.sdpa_model))
    from transformers import AutoModel, MPNetConfig

    _, tokenizer = load_pretrained(EncoderSpec(sizes.big))
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return AutoModel.from_config(config), tokenizer


@contextmanager
def sdpa_attention(model, enabled: bool = True) -> Iterator[None]:
    """While active, `model`'s MPNet self-attention runs through layerfusion's SDPA path (or eager)."""
    set_mpnet_sdpa(model, enabled)
    try:
        yield
    finally:
        set_mpnet_sdpa(model, True)  # what FrozenEncoder sets up
