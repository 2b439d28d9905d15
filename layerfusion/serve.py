"""`layerfusion serve`: a trained `Classifier` behind HTTP on LitServe, with dynamic batching.

`POST /predict` takes `{"text": "..."}` or `{"texts": [...]}` (optional `top_k`) and answers with the rows
`layerfusion classify` prints; `GET /health` says whether the workers are ready; `GET /info` describes the
model. Each inference worker is a process (LitServe spawns one per device and `--workers`) that loads the
classifier once and runs its predict loop in one thread; requests that arrive while a batch is gathered
are classified together. Alongside: the request check (`serve_requests`), LitServe's server and batched
loop as run here (`serve_litserve`), the padded input shapes of the encoders (`serve_shapes`).
"""

from __future__ import annotations

import ctypes
import gc
import os
import socket
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np

from layerfusion.errors import ConfigError
from layerfusion.serve_litserve import BlockingBatchedLoop, ClassifierServer
from layerfusion.serve_requests import MAX_BODY_BYTES, MAX_TEXTS, RequestGuard
from layerfusion.serve_shapes import ShapeBuckets, length_buckets, row_buckets


class ClassifierAPI(ls.LitAPI):
    """The LitServe API of one classifier: requests are checked by `RequestGuard` before they get here.

    Args:
        model: a `fit` checkpoint (`.ckpt`) or a folder written by `Classifier.save`.
        compute_dtype: precision of the encoders (default: as trained; see `EncoderSpec.compute_dtype`).
        threads: intra-op threads of each CPU worker (default: the CPU's cores shared among the workers).
        max_batch_size: requests gathered into one batch, and texts per forward pass.
        batch_timeout: seconds a batch waits for more requests after its first one; 0 (default): a batch
            is what has queued while the previous one ran, so a lone request never waits.
        trust_remote_code: let the encoders' model directories run their own Python code.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        compute_dtype: str | None = None,
        threads: int | None = None,
        max_batch_size: int = 16,
        batch_timeout: float = 0.0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            loop=BlockingBatchedLoop() if max_batch_size > 1 else "auto",
        )
        self.model, self.compute_dtype, self.threads = str(model), compute_dtype, threads
        self.trust_remote_code = trust_remote_code

    def setup(self, device: str) -> None:
        """Load the classifier once for this worker, on `device`, and run each padded input shape once
        (`ShapeBuckets`), so that the memory a new shape takes is taken before the server is ready."""
        import torch
        from tqdm import tqdm

        # a thread lock for tqdm (the classifier's progress bar, off here): its default is a
        # multiprocessing lock, which the resource tracker reports as leaked when LitServe kills the worker
        tqdm.set_lock(threading.RLock())
        if torch.device(device).type == "cpu" and self.threads:
            torch.set_num_threads(self.threads)
        self.classifier = load_classifier(
            self.model,
            device=device,
            compute_dtype=self.compute_dtype,
            batch_size=self.max_batch_size,
            trust_remote_code=self.trust_remote_code,
            progress_bar=False,
        )
        clf = self.classifier
        for key, encoder in clf.encoders.items():
            buckets = ShapeBuckets(encoder, self.max_batch_size)
            buckets.warm_up(max(clf.layers[key]), clf.device, clf.token_budget)

    def decode_request(self, request) -> tuple[list[str], int | None, bool]:
        """(texts, top_k, whether the request gave one `text`) from a body `RequestGuard` has checked."""
        single = "text" in request
        return ([request["text"]] if single else request["texts"]), request.get("top_k"), single

    def predict(self, batch: Any) -> Any:
        """Classify the texts of every request in the batch in one call: per request, (rows, single)."""
        requests = [batch] if self.max_batch_size == 1 else batch  # LitServe's unbatched loop
        texts = [t for request_texts, _, _ in requests for t in request_texts]
        probs = np.asarray(self.classifier.predict_proba(texts), dtype=np.float64)
        out, start = [], 0
        for request_texts, top_k, single in requests:
            rows = probs[start : start + len(request_texts)]
            out.append(([self._row(t, p, top_k) for t, p in zip(request_texts, rows)], single))
            start += len(request_texts)
        return out[0] if self.max_batch_size == 1 else out

    def encode_response(self, output: tuple[list[dict], bool]) -> dict[str, Any]:
        """One row for a `text` request, `{"predictions": [rows]}` for a `texts` request."""
        rows, single = output
        return rows[0] if single else {"predictions": rows}

    def _row(self, text: str, p: np.ndarray, top_k: int | None) -> dict[str, Any]:
        """`{"text", "label", "probs"}` as `classify` prints it; `top_k` keeps the k most probable labels."""
        names = self.classifier.label_names
        if top_k is None:
            probs = {n: float(v) for n, v in zip(names, p)}
        else:
            best = np.argsort(-p, kind="stable")[:top_k]
            probs = {names[i]: float(p[i]) for i in best}
        return {"text": text, "label": names[int(p.argmax())], "probs": probs}


def serve(
    model: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    device: str = "auto",
    compute_dtype: str | None = None,
    max_batch_size: int = 16,
    batch_timeout: float = 0.0,
    max_texts: int = MAX_TEXTS,
    max_body_bytes: int = MAX_BODY_BYTES,
    timeout: float = 30.0,
    trust_remote_code: bool = False,
    threads: int | None = None,
) -> None:
    """Serve the classifier in `model` until Ctrl+C or SIGTERM (see the module docstring for the endpoints)."""
    accelerator, devices = _parse_device(device)
    if workers < 1 or max_batch_size < 1 or max_texts < 1 or max_body_bytes < 1:
        raise ConfigError(
            "--workers, --max-batch-size, --max-texts and --max-body-bytes must be >= 1"
        )
    if batch_timeout < 0 or timeout <= batch_timeout:
        raise ConfigError("--batch-timeout must be >= 0 and below --timeout")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    _check_port(host, port)
    info = describe(model, compute_dtype, accelerator, trust_remote_code)
    if accelerator == "cpu" and threads is None:
        threads = default_threads(workers)
    api = ClassifierAPI(
        model, compute_dtype, threads, max_batch_size, batch_timeout, trust_remote_code
    )
    info["serving"] = {
        "max_batch_size": max_batch_size,
        "padded_rows": row_buckets(max_batch_size),
        "batch_timeout": batch_timeout,
        "threads_per_worker": threads,
        "max_texts": max_texts,
        "max_body_bytes": max_body_bytes,
        "workers": "processes, each with the classifier loaded once and one predict thread",
    }
    server = ClassifierServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers,
        timeout=timeout,
        model_metadata=info,
        middlewares=[(RequestGuard, {"max_texts": max_texts, "max_body_bytes": max_body_bytes})],
    )
    server.ready_line = (
        f"layerfusion serve: {model} on http://{host}:{port} "
        "(POST /predict, GET /health, GET /info); Ctrl+C or SIGTERM stops it"
    )
    server.run(
        host=host,
        port=port,
        log_level="warning",
        generate_client_file=False,
        api_server_worker_type="process",
    )
    print("layerfusion serve: stopped", file=sys.stderr, flush=True)


def default_threads(workers: int) -> int:
    """Torch threads of each CPU worker: the cores less one (the HTTP server's), shared among the workers."""
    return max(1, ((os.cpu_count() or 1) - 1) // workers)


def describe(
    model: str | os.PathLike,
    compute_dtype: str | None,
    device_type: str,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """What `GET /info` shows: labels, encoders (weights hash, revision, layers read, precision), version.

    Loads the classifier once on the CPU, so that a bad model fails here with one line, before any worker starts.
    """
    clf = load_classifier(
        model, device="cpu", compute_dtype=compute_dtype, trust_remote_code=trust_remote_code
    )
    ids = clf.config["encoder_ids"]
    encoders = []
    for key, encoder in clf.encoders.items():
        recorded = ids[key]  # what the head was trained on, checked against the loaded encoder
        row = {"key": key, "name": encoder.spec.name}
        row.update(
            {
                f: recorded[f]
                for f in ("revision", "weights_sha256", "tokenizer_sha256")
                if recorded.get(f)
            }
        )
        row["layers"] = clf.layers[key]
        row["compute_dtype"] = encoder.compute_precision(device_type)
        row["padded_lengths"] = length_buckets(encoder.max_length)
        encoders.append(row)
    info = {
        "label_names": list(clf.label_names),
        "head": clf.config["head"],
        "encoders": encoders,
        "layerfusion": _version(),
    }
    del clf
    gc.collect()
    _release_freed_memory()  # the processes forked from this one (HTTP server, manager) start smaller
    return info


def load_classifier(model: str | os.PathLike, **kwargs: Any):
    """A `Classifier` from a `fit` checkpoint or a saved folder."""
    from layerfusion.classifier import Classifier

    path = Path(model)
    return (
        Classifier.load(path, **kwargs)
        if path.is_dir()
        else Classifier.from_checkpoint(path, **kwargs)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`layerfusion serve CKPT_OR_DIR [options]`."""
    import argparse

    from layerfusion.classify import add_encoder_options

    parser = argparse.ArgumentParser(
        prog="layerfusion serve",
        description="Serve a trained classifier over HTTP (LitServe): POST /predict with "
        '{"text": ...} or {"texts": [...]} (optional "top_k"), GET /health, GET /info.',
    )
    parser.add_argument(
        "model", metavar="CKPT_OR_DIR", help="a .ckpt file or a saved classifier folder"
    )
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default), 0.0.0.0 or ::")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000")
    parser.add_argument(
        "--workers", type=int, default=1, help="inference processes per device (default: 1)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (default: every GPU, else the CPU), cpu, cuda (every GPU) or cuda:0,1",
    )
    add_encoder_options(parser)
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="requests gathered into one batch, and texts per forward pass (default: 16)",
    )
    parser.add_argument(
        "--batch-timeout",
        type=float,
        default=0.0,
        help="seconds a batch waits for more requests after its first (default: 0, a batch is what "
        "queued while the previous one ran)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of each CPU worker (default: the cores less one, shared among the workers)",
    )
    parser.add_argument(
        "--max-texts", type=int, default=MAX_TEXTS, help=f"texts per request (default: {MAX_TEXTS})"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=MAX_BODY_BYTES,
        help=f"request body limit (default: {MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a request may wait in the queue for a worker (default: 30; a 504 JSON error after)",
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "0.0.0.0", "::"):
        parser.error(
            f"--host must be 127.0.0.1, 0.0.0.0 or :: (LitServe binds no other), got {args.host}"
        )
    if not 1024 <= args.port <= 65535:
        parser.error(f"--port must be in 1024..65535, got {args.port}")
    serve(**vars(args))  # every option is one of serve's parameters, by the same name
    return 0


# ----------------------------------------------------------------------------- helpers


def _release_freed_memory() -> None:
    """Give the heap memory freed by Python back to the system (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _check_port(host: str, port: int) -> None:
    """Fail with one line, before loading anything, when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {err.strerror} (choose another --port)"
            ) from None


def _parse_device(device: str) -> tuple[str, str | list[int]]:
    """LitServe's (accelerator, devices) for --device: auto, cpu, cuda, cuda:0,1."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cpu", "cuda"):
        return device, "auto"
    head, _, ids = device.partition(":")
    if head == "cuda" and ids and all(i.strip().isdigit() for i in ids.split(",")):
        return "cuda", [int(i) for i in ids.split(",")]
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N[,M...], got {device!r}")


def _version() -> str:
    try:
        return version("layerfusion")
    except PackageNotFoundError:
        from layerfusion import __version__

        return __version__


__all__ = ["ClassifierAPI", "RequestGuard", "serve", "main"]
