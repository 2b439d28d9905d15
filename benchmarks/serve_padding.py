"""What `layerfusion serve`'s padded input shapes change in the predictions, in-process.

    python benchmarks/serve_padding.py [--texts 1821] [--out benchmarks/serve_padding.json]

The classifier of `benchmarks/serve.py` (all-MiniLM-L6-v2, layers 4, 5, 6, a seeded untrained gated
head) on the SST-2 test sentences in file order, in batches of 16 as the server forms them under
load, once as `Classifier.predict_proba` runs them and once with the server's `ShapeBuckets` on the
encoder (each forward pass padded to a bucket shape); per compute dtype (bf16 autocast, what `auto`
picks on an AVX512-BF16 CPU, and fp32): labels that differ, the largest probability difference, and
the same for the sentences alone against in batches of 16 without padding (what batch composition
alone changes); the seconds of the batched runs, padded (after the warm-up) and not. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchutil import REPO, data_dir, log, machine_info
from serve import minilm_classifier

from layerfusion.classifier import Classifier
from layerfusion.serve_shapes import ShapeBuckets

BATCH = 16


def main() -> None:
    """Compare the predictions and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=None, help="first N test sentences (all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "serve_padding.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = (data_dir() / "sst2" / "test.jsonl").open()
    texts = [json.loads(line)["text"] for line in lines][: args.texts]
    results = {"machine": machine_info(), "texts": len(texts), "batch_rows": BATCH, "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = minilm_classifier(Path(tmp) / "clf")
        for dtype in ("bfloat16", "float32"):
            clf = Classifier.load(folder, device="cpu", compute_dtype=dtype, batch_size=BATCH)
            plain, plain_s = batched(clf, texts)
            buckets = ShapeBuckets(clf.encoders["minilm"], BATCH)
            buckets.warm_up(6, "cpu", clf.token_budget)
            padded, padded_s = batched(clf, texts)
            buckets.remove()
            alone = np.concatenate([clf.predict_proba([t]) for t in texts])
            results["dtypes"][dtype] = {
                "padded_vs_unpadded": compare(padded, plain),
                "alone_vs_batched_unpadded": compare(alone, plain),
                "seconds_unpadded": round(plain_s, 2),
                "seconds_padded": round(padded_s, 2),
                "padded_time_ratio": round(padded_s / plain_s, 3),
            }
            log(f"{dtype}: {results['dtypes'][dtype]}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def batched(clf: Classifier, texts: list[str]) -> tuple[np.ndarray, float]:
    """Probabilities of `texts` in consecutive batches of `BATCH` (as the server's), and the seconds."""
    start = time.perf_counter()
    probs = [clf.predict_proba(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
    return np.concatenate(probs), time.perf_counter() - start


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Labels that differ and the largest absolute probability difference."""
    return {
        "labels_differing": int((a.argmax(1) != b.argmax(1)).sum()),
        "max_abs_prob_diff": float(np.abs(a - b).max()),
    }


if __name__ == "__main__":
    main()
