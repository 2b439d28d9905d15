"""LitServe's server and batched loop as `layerfusion serve` runs them: a ready line, SIGTERM handling, a
worker that dies while loading stops the server, one shutdown; a loop that blocks while idle and answers
504 to a request that waited past `--timeout`."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from queue import Empty
from typing import Any

import litserve as ls
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import (
    LitAPIStatus,
    LoopResponseType,
    PickleableHTTPException,
    WorkerSetupStatus,
)

from layerfusion.errors import LayerFusionError


class ServeError(LayerFusionError):
    """The server could not start serving: the message says what failed."""


class ClassifierServer(ls.LitServer):
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


class BlockingBatchedLoop(BatchedLoop):
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
