"""Throughput of a forward with every layer tapped (pooling hooks) vs the same forward without hooks."""

from __future__ import annotations

import torch
from benchutil import Sizes, log, median, round_ratios, sst2_slice, timed

from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder, load_pretrained


def bench_tap_overhead(sizes: Sizes, device: str) -> dict:
    """`tap_overhead_ratio` = tapped throughput / plain throughput, same model, same batches."""
    # fp32 like the bare forward it is compared with
    spec = EncoderSpec(sizes.big, max_length=sizes.max_length, compute_dtype="float32")
    model, tokenizer = load_pretrained(spec)
    model.to(device).eval()
    texts, _ = sst2_slice(sizes.tap_texts, seed=1)
    batches = [
        tokenizer(
            texts[i : i + sizes.batch_size],
            truncation=True,
            max_length=sizes.max_length,
            padding=True,
            return_tensors="pt",
        ).to(device)
        for i in range(0, len(texts), sizes.batch_size)
    ]
    run = {
        "tapped": lambda b: tapped_forward(spec, model, tokenizer, b, device),
        "plain": lambda b: plain_forward(model, b, device),
    }
    for name in run:  # warm-up
        run[name](batches[0])
    times: dict[str, list[float]] = {"tapped": [], "plain": []}
    for r in range(sizes.tap_rounds):
        spent = {"tapped": 0.0, "plain": 0.0}
        for b, batch in enumerate(batches):  # pairs batch by batch, alternating which goes first
            for name in ("tapped", "plain") if (r + b) % 2 == 0 else ("plain", "tapped"):
                spent[name] += run[name](batch)
        for name in spent:
            times[name].append(spent[name])
        log(f"tap overhead round {r}: tapped {spent['tapped']:.2f}s, plain {spent['plain']:.2f}s")
    ratios = round_ratios(times["plain"], times["tapped"])  # throughput ratio = inverse time ratio
    return {
        "tap_overhead_ratio": median(ratios),
        "raw": {
            "model": sizes.big,
            "texts": len(texts),
            "batches": len(batches),
            "batch_size": sizes.batch_size,
            "tapped_layers": model.config.num_hidden_layers + 1,
            "seconds": times,
            "round_ratios": ratios,
        },
    }


def tapped_forward(spec: EncoderSpec, model, tokenizer, batch, device: str) -> float:
    """Seconds of one `FrozenEncoder` forward (hooks pool every layer); the hooks are removed after."""
    encoder = FrozenEncoder(spec, model, tokenizer)
    try:
        with torch.inference_mode():
            return timed(lambda: encoder(batch["input_ids"], batch["attention_mask"]), device)
    finally:
        encoder.close()


def plain_forward(model, batch, device: str) -> float:
    """Seconds of one forward of the bare model (no hooks registered)."""
    with torch.inference_mode():
        return timed(
            lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
            device,
        )
