"""Thread safety: one `Classifier` (and one `FrozenEncoder`) called from several threads at once gives
every call exactly what a serial call gives, with batches of different lengths and early-exit depths."""

from __future__ import annotations

import threading

import pytest
import torch

from layerfusion import Classifier
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.fusion.heads import build_head

pytestmark = pytest.mark.usefixtures("one_thread")

THREADS, CALLS = 4, 6
LAYERS = {"bert": [0, 1], "gpt2": [1]}  # both encoders stop early: bert after block 0, gpt2 too


def _texts(thread: int) -> list[str]:
    """Texts whose lengths differ from thread to thread (so do the padded batch shapes)."""
    words = "the film is a gripping , beautifully acted and rather long story".split()
    return [" ".join(words[: 1 + (thread * 3 + i) % len(words)]) * (1 + thread) for i in range(5)]


def _run_concurrently(work, args: list, calls: int = CALLS) -> tuple[list, list[BaseException]]:
    """`work(arg)` `calls` times per arg, each arg in its own thread, all released together."""
    barrier = threading.Barrier(len(args))
    results: list = [[] for _ in args]
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        barrier.wait()
        for _ in range(calls):
            try:
                results[i].append(work(args[i]))
            except BaseException as err:  # collected: the test reports how many calls failed
                errors.append(err)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def build_classifier(
    specs: list[dict], layers: dict[str, list[int]], batch_size: int = 2
) -> Classifier:
    """A Classifier over the encoders of `specs` with a random gated head (3 classes), as `save` would
    write it: encoder settings, layers and each encoder's `identity()`."""
    encoders = {s["alias"]: FrozenEncoder(EncoderSpec(**s)) for s in specs}
    torch.manual_seed(0)
    head = build_head(
        "gated",
        dims={k: e.hidden_size for k, e in encoders.items()},
        num_layers={k: e.num_layers for k, e in encoders.items()},
        layers=layers,
        num_classes=3,
        hidden=16,
    )
    config = {
        "format": "layerfusion-classifier",
        "version": 1,
        "label_names": ["a", "b", "c"],
        "head": "gated",
        "head_args": {"hidden": 16},
        "layers": layers,
        "encoders": specs,
        "encoder_ids": {k: e.identity() for k, e in encoders.items()},
    }
    return Classifier(config, head.state_dict(), device="cpu", batch_size=batch_size)


@pytest.fixture(scope="module")
def classifier(tiny_models) -> Classifier:
    """A Classifier over a tiny BERT and a tiny GPT-2 (both early exits), batches of 2 texts."""
    bert = dict(name=tiny_models["bert"], alias="bert", max_length=32, compute_dtype="float32")
    gpt2 = dict(name=tiny_models["gpt2"], alias="gpt2", pooling="last", max_length=32)
    return build_classifier([bert, {**gpt2, "compute_dtype": "float32"}], LAYERS)


def test_classifier_called_from_threads_equals_serial(classifier):
    inputs = [_texts(t) for t in range(THREADS)]
    serial = [classifier.predict_proba(texts) for texts in inputs]
    results, errors = _run_concurrently(classifier.predict_proba, inputs)
    assert not errors, f"{len(errors)} of {THREADS * CALLS} calls raised, e.g. {errors[0]!r}"
    for t, calls in enumerate(results):
        for probs in calls:
            torch.testing.assert_close(probs, serial[t], atol=1e-6, rtol=0)


def test_encoder_called_from_threads_at_different_depths_equals_serial(classifier):
    encoder = classifier.encoders["bert"]
    inputs = []
    for t in range(THREADS):  # each thread its own batch shape and its own early-exit depth
        batch = encoder.tokenizer(_texts(t), padding=True, return_tensors="pt")
        inputs.append((batch["input_ids"], batch["attention_mask"], t % encoder.num_layers))
    assert len({ids.shape[1] for ids, _, _ in inputs}) == THREADS

    def work(args):
        return encoder(*args[:2], depth=args[2])

    serial = [work(args) for args in inputs]
    results, errors = _run_concurrently(work, inputs)
    assert not errors, f"{len(errors)} of {THREADS * CALLS} calls raised, e.g. {errors[0]!r}"
    for t, calls in enumerate(results):
        for out in calls:
            assert out.shape == serial[t].shape
            torch.testing.assert_close(out, serial[t], atol=1e-6, rtol=0)


def test_tokenize_from_threads_with_different_max_lengths(classifier):
    """A fast tokenizer keeps each call's truncation on the shared object: concurrent calls with other
    settings must still each get their own (the one tokenize function serialises them)."""
    from layerfusion.encoders.forward import tokenize

    tokenizer = classifier.encoders["bert"].tokenizer
    texts = ["word " * 100] * 32
    lengths = [16, 24, 32, 40]

    def work(max_length):
        return tokenize(tokenizer, texts, max_length)["input_ids"].shape[1]

    results, errors = _run_concurrently(work, lengths, calls=10)
    assert not errors, errors[:2]
    wrong = [(n, got) for n, calls in zip(lengths, results) for got in calls if got != n]
    assert not wrong, (
        f"{len(wrong)} of {len(lengths) * 10} calls got another call's length: {wrong[:4]}"
    )
