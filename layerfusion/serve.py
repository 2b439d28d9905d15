"""`layerfusion serve`: a trained `Classifier` behind HTTP on LitServe, with dynamic batching.

`POST /predict` takes `{"text": "..."}` or `{"texts": [...]}` (optional `top_k`) and answers with the rows
`layerfusion classify` prints; `GET /health` says whether the workers are ready; `GET /info` describes the
model. Each inference worker is a process (LitServe spawns one per device and `--workers`) that loads the
classifier once and runs its predict loop in one thread; requests that arrive while a batch is gathered
are classified together.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from queue import Empty
from typing import Any

import litserve as ls
import numpy as np
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import (
    LitAPIStatus,
    LoopResponseType,
    PickleableHTTPException,
    WorkerSetupStatus,
)

from layerfusion.errors import ConfigError, LayerFusionError
from layerfusion.serve_shapes import ShapeBuckets, length_buckets, row_buckets

MAX_TEXTS, MAX_BODY_BYTES = 256, 1 << 20


class ServeError(LayerFusionError):
    """The server could not start serving: the message says what failed."""


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
            loop=_BatchedLoop() if max_batch_size > 1 else "auto",
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


class RequestGuard:
    """ASGI middleware in front of `POST /predict`: a request that is not a valid body gets a 4xx JSON
    `{"detail": ...}` naming what is wrong, and never reaches the inference workers.

    Args:
        app: the ASGI app it wraps.
        max_texts: most texts one request may carry.
        max_body_bytes: largest request body accepted (413 beyond it).
    """

    def __init__(
        self, app, max_texts: int = MAX_TEXTS, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.app, self.max_texts, self.max_body_bytes = app, max_texts, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, status, problem = await self._read(scope, receive)
        if problem is None:
            status, problem = self._check(body)
        if problem is not None:
            await _send_json(send, status, {"detail": problem})
            return
        # the body is JSON: say so (curl -d sends form-urlencoded), and hand it on unchanged
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope, receive) -> tuple[bytes, int, str | None]:
        """The whole body, or the reason it is refused: too large (413) or the client left (400)."""
        limit = self.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", 413, f"request body of {int(length)} bytes is over the {limit}-byte limit"
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", 400, "the client disconnected before sending the whole body"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", 413, f"request body is over the {limit}-byte limit"
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), 200, None

    def _check(self, body: bytes) -> tuple[int, str | None]:
        """(status, problem) of a request body: 400 when it is not JSON, 422 when the JSON is not a request."""
        if not body.strip():
            return 400, 'no request body: send JSON {"text": "..."} or {"texts": ["...", ...]}'
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return 400, f"request body is not valid JSON ({err})"
        if not isinstance(request, dict):
            return 422, f"request body is a JSON {_json_type(request)}, not an object"
        unknown = sorted(set(request) - {"text", "texts", "top_k"})
        if unknown:
            return 422, f"unknown field(s) {unknown}: a request has 'text' or 'texts', and 'top_k'"
        if ("text" in request) == ("texts" in request):
            both = "both" if "text" in request else "neither"
            return 422, f"request has {both} 'text' and 'texts': give exactly one"
        top_k = request.get("top_k")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            return 422, f"'top_k' must be a positive integer, got {json.dumps(top_k)}"
        if "text" in request:
            return _check_text(request["text"], "'text'")
        texts = request["texts"]
        if not isinstance(texts, list):
            return 422, f"'texts' must be a list of strings, got a JSON {_json_type(texts)}"
        if not texts:
            return 422, "'texts' is empty: give at least one text"
        if len(texts) > self.max_texts:
            return 422, f"'texts' has {len(texts)} texts; at most {self.max_texts} per request"
        for i, text in enumerate(texts):
            status, problem = _check_text(text, f"'texts'[{i}]")
            if problem:
                return status, problem
        return 200, None


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
    server = _Server(
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
    serve(
        args.model,
        host=args.host,
        port=args.port,
        workers=args.workers,
        device=args.device,
        compute_dtype=args.compute_dtype,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        max_texts=args.max_texts,
        max_body_bytes=args.max_body_bytes,
        timeout=args.timeout,
        trust_remote_code=args.trust_remote_code,
        threads=args.threads,
    )
    return 0


# ----------------------------------------------------------------------------- helpers


class _Server(ls.LitServer):
    """LitServer that prints one line once a worker is ready (LitServe's own logs stay at warning level),
    stops on SIGTERM like on `/shutdown`, and shuts down once, its worker monitor stopped first."""

    ready_line = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop_lock, self._stopped = threading.Lock(), False

    def verify_worker_status(self) -> None:
        # LitServe 0.2.19 waits forever for a worker that died while loading (killed for memory, say)
        while not any(v == WorkerSetupStatus.READY for v in self.workers_setup_status.values()):
            failed = any(v == WorkerSetupStatus.ERROR for v in self.workers_setup_status.values())
            dead = [w.exitcode for w in self.inference_workers if w.exitcode is not None]
            if failed or dead:
                self._perform_graceful_shutdown(self.transport_config.manager, {}, "failed start")
                how = f"exited with code {dead[0]}" if dead else "failed"
                hint = " (-9: killed, often for lack of memory)" if -9 in dead else ""
                raise ServeError(f"an inference worker {how} while loading the model{hint}")
            time.sleep(0.05)
        print(self.ready_line, file=sys.stderr, flush=True)

    def run(self, *args: Any, **kwargs: Any) -> None:
        owner = os.getpid()

        def on_sigterm(signum, frame):
            # a forked child that kept this handler (LitServe's queue process): when the whole group
            # gets SIGTERM (systemd), the server still needs it and stops it; an orphan dies
            if os.getpid() != owner:
                if os.getppid() == owner:
                    return
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            elif self._shutdown_event is None:  # before LitServe has started anything
                raise KeyboardInterrupt
            else:  # what /shutdown does; from a thread of its own (the main one may be waiting on it)
                threading.Thread(target=self._shutdown_event.set, daemon=True).start()

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            super().run(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _perform_graceful_shutdown(
        self, manager, uvicorn_workers, shutdown_reason="normal"
    ) -> None:
        # LitServe 0.2.19 may run this twice at once (main thread, and its monitor when it sees the
        # workers it is stopping), and its monitor then polls the manager it shut down (a traceback)
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            setter = threading.Thread(target=self._shutdown_event.set, daemon=True)
            setter.start()
            setter.join(timeout=5)
            for thread in threading.enumerate():
                if (
                    thread.name == "litserve-monitoring"
                    and thread is not threading.current_thread()
                ):
                    thread.join(timeout=self.monitor_internal + 5)
            # an HTTP server that already stopped (the whole group got SIGTERM) is not a warning
            alive = {i: w for i, w in uvicorn_workers.items() if w.is_alive()}
            super()._perform_graceful_shutdown(manager, alive, shutdown_reason)


class _BatchedLoop(BatchedLoop):
    """LitServe's batched loop, waiting for a batch's first request in one blocking call, then for the
    rest until `batch_timeout` after it (with 0, only those already queued). LitServe 0.2.19's own loop
    polls the request queue every millisecond while idle: ~13 % of a core per worker, with nothing to do.
    A request that waited past `--timeout` is answered 504 here, with a message naming the option."""

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue, transport) -> tuple[list, list]:
        try:
            item = request_queue.get(timeout=1.0)
        except Empty:
            return [], []
        payloads = []
        deadline = time.monotonic() + lit_api.batch_timeout
        while True:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, x_enc = item
            self.put_response(  # LitServe drops it unless it restarts workers (off here)
                transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR
            )
            waited, timeout = time.monotonic() - timestamp, lit_api.request_timeout
            if timeout not in (-1, False, None) and waited > timeout:
                self._time_out(transport, response_queue_id, uid, waited, timeout)
            else:
                payloads.append((response_queue_id, uid, x_enc))
            if len(payloads) >= lit_api.max_batch_size:
                return payloads, []
            remaining = deadline - time.monotonic()
            try:
                item = (
                    request_queue.get(timeout=remaining)
                    if remaining > 0
                    else request_queue.get_nowait()
                )
            except Empty:
                return payloads, []

    def _time_out(self, transport, response_queue_id, uid, waited: float, timeout: float) -> None:
        """Answer 504 to a request that waited in the queue past `--timeout`, and say so once per request
        (LitServe's own message names its Python API, not the option)."""
        detail = f"request timed out: it waited {waited:.1f} s for a worker, over --timeout {timeout:g} s"
        print(
            f"layerfusion serve: {detail}; answered 504 (raise --timeout or --workers, or send less)",
            file=sys.stderr,
            flush=True,
        )
        error = PickleableHTTPException(504, detail)
        self.put_response(
            transport, response_queue_id, uid, error, LitAPIStatus.ERROR, LoopResponseType.REGULAR
        )


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


def _check_text(text: Any, where: str) -> tuple[int, str | None]:
    if not isinstance(text, str):
        return 422, f"{where} must be a string, got a JSON {_json_type(text)}"
    if not text.strip():
        return 422, f"{where} is empty (or only whitespace)"
    return 200, None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


async def _send_json(send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _version() -> str:
    try:
        return version("layerfusion")
    except PackageNotFoundError:
        from layerfusion import __version__

        return __version__


__all__ = ["ClassifierAPI", "RequestGuard", "serve", "main"]
