"""`layerfusion serve`: one real server process on 127.0.0.1 (a random free port) for the module, serving a
classifier over two tiny encoders; predictions equal the in-process `Classifier`'s, concurrent clients, every
bad request gets a 4xx JSON error and the server keeps serving, SIGTERM stops it cleanly."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_pair_specs
from test_threads import build_classifier

from layerfusion.classifier import Classifier
from layerfusion.serve_shapes import ShapeBuckets, bucket, length_buckets, row_buckets

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ["a", "b", "c"]  # build_classifier's
TEXTS = ["a gripping, beautifully acted film", "dull", "it is what it is . " * 20, "ok", "wow"]
MAX_TEXTS, MAX_BODY, TIMEOUT = 4, 4096, 4.0


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_models) -> Path:
    """A saved classifier: a gated head (random, seeded) over a tiny BERT (layers 0, 2) and a tiny GPT-2
    (layer 1 of 0..2: an early exit), fp32 so that batch composition does not change the probabilities."""
    specs = [dataclasses.asdict(s) for s in tiny_pair_specs(tiny_models)]
    clf = build_classifier(specs, {"bert": [0, 2], "gpt2": [1]})
    return clf.save(tmp_path_factory.mktemp("serve") / "clf")


@pytest.fixture(scope="module")
def expected(classifier_dir) -> dict[str, np.ndarray]:
    """The in-process classifier's probabilities per text (columns in label order)."""
    probs = np.asarray(Classifier.load(classifier_dir, device="cpu").predict_proba(TEXTS))
    return dict(zip(TEXTS, probs))


@pytest.fixture(scope="module")
def server(classifier_dir, tmp_path_factory):
    """`python -m layerfusion serve` on a free port of 127.0.0.1, ready; stopped at the end if a test did not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cwd = tmp_path_factory.mktemp("serve-cwd")
    stderr = open(cwd / "stderr.txt", "w+")  # noqa: SIM115 (read by the SIGTERM test)
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerfusion", "serve", str(classifier_dir), "--port", str(port)]
        + ["--device", "cpu", "--max-batch-size", "8", "--batch-timeout", "0.05"]
        + ["--max-texts", str(MAX_TEXTS), "--max-body-bytes", str(MAX_BODY)]
        + ["--timeout", str(TIMEOUT)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,  # its own process group, for the SIGTERM test
    )
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            stderr.seek(0)
            pytest.fail(f"the server exited ({proc.returncode}):\n{stderr.read()[-3000:]}")
        try:
            if _request(port, "GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            _kill_tree(proc)
            pytest.fail("the server was not ready within 300 s")
        time.sleep(0.5)
    children = {pid: _started(pid) for pid in _descendants(proc.pid)}
    yield proc, port, stderr, cwd
    _kill_tree(proc, children)  # what a failed test left running
    stderr.close()


def test_predictions_equal_the_classifier(server, expected, classifier_dir):
    _, port, _, _ = server
    status, row = _post(port, {"text": TEXTS[0]})
    assert status == 200
    assert set(row) == {"text", "label", "probs"} and row["text"] == TEXTS[0]
    _assert_row(row, expected)
    status, body = _post(port, {"texts": TEXTS[:MAX_TEXTS]})
    assert status == 200 and [r["text"] for r in body["predictions"]] == TEXTS[:MAX_TEXTS]
    for row in body["predictions"]:
        _assert_row(row, expected)
    status, body = _post(port, {"texts": TEXTS[:2], "top_k": 2})
    for row in body["predictions"]:
        p = expected[row["text"]]
        best = np.argsort(-p)[:2]
        assert list(row["probs"]) == [LABELS[i] for i in best]
        assert list(row["probs"].values()) == pytest.approx(p[best], abs=1e-5)

    status, info = _request(port, "GET", "/info")
    model = json.loads(info)["model"]
    assert status == 200 and model["label_names"] == LABELS
    saved = json.loads((classifier_dir / "classifier.json").read_text())
    assert [e["key"] for e in model["encoders"]] == ["bert", "gpt2"]
    for e in model["encoders"]:
        for field in ("weights_sha256", "tokenizer_sha256"):
            assert e[field] == saved["encoder_ids"][e["key"]][field]
        assert e["layers"] == saved["layers"][e["key"]] and e["compute_dtype"] == "float32"
    assert model["layerfusion"] and model["serving"]["max_batch_size"] == 8
    assert model["serving"]["padded_rows"] == list(range(1, 9))
    assert [e["padded_lengths"] for e in model["encoders"]] == [[8, 16, 24, 32]] * 2


def test_shape_buckets_bound_the_shapes_and_keep_the_probabilities(classifier_dir, expected):
    """With `ShapeBuckets` on its encoders, a classifier's models see only the shapes the warm-up ran
    (any batch, any text length), and its probabilities stay those of the unpadded classifier."""
    clf = Classifier.load(classifier_dir, device="cpu", batch_size=10)
    seen: set[tuple[int, int]] = set()
    for encoder in clf.encoders.values():
        encoder.model.register_forward_pre_hook(
            lambda m, a, kw: seen.add(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
    buckets = [ShapeBuckets(encoder, max_rows=10) for encoder in clf.encoders.values()]
    assert buckets[0].rows == [*range(1, 9), 10] and buckets[0].lengths == [8, 16, 24, 32]
    assert [b.warm_up(2, "cpu") for b in buckets] == [36, 36]
    warmed, seen = set(seen), set()
    texts = TEXTS + [" ".join(["word"] * n) for n in range(1, 29, 2)]
    probs = clf.predict_proba(texts)
    assert seen and seen <= warmed
    assert len({length for _, length in seen}) > 1  # batches of 10 and 9 (padded to 10) texts
    assert probs[: len(TEXTS)] == pytest.approx(np.stack([expected[t] for t in TEXTS]), abs=1e-5)
    for b in buckets:
        b.remove()
    assert np.allclose(clf.predict_proba(texts), probs, atol=1e-5)


def test_bucket_sizes():
    assert length_buckets(512) == [8, 16, 24, 32, 40, 48, 56, 64, 96, 144, 216, 320, 480, 512]
    assert length_buckets(20) == [8, 16, 20] and length_buckets(5) == [5]
    assert row_buckets(16) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]
    assert row_buckets(40)[-6:] == [16, 20, 24, 28, 32, 40] and row_buckets(9) == [*range(1, 9), 9]
    assert row_buckets(1) == [1]
    assert bucket(9, [8, 16]) == 16 and bucket(8, [8, 16]) == 8 and bucket(17, [8, 16]) == 17


def test_concurrent_clients_each_get_their_own_rows(server, expected):
    _, port, _, _ = server

    def client(i: int) -> list[tuple[int, dict]]:
        out = []
        for j in range(4):
            k = (i + j) % len(TEXTS)
            body = {"text": TEXTS[k]} if j % 2 else {"texts": [TEXTS[k], TEXTS[k - 1]]}
            out.append(_post(port, body))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client, range(8)) for r in rs]
    assert len(results) == 32
    for status, body in results:
        assert status == 200
        for row in body.get("predictions", [body]):
            _assert_row(row, expected)


BAD = [
    (b"", 400, "no request body"),
    (b'{"text": "good",', 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b'["good"]', 422, "JSON array, not an object"),
    (b'{"txt": "good"}', 422, "unknown field(s) ['txt']"),
    (b'{"top_k": 1}', 422, "neither 'text' and 'texts'"),
    (b'{"text": 3}', 422, "'text' must be a string, got a JSON number"),
    (b'{"texts": ["a", null]}', 422, "'texts'[1] must be a string, got a JSON null"),
    (b'{"texts": "good"}', 422, "'texts' must be a list of strings"),
    (b'{"text": "  "}', 422, "'text' is empty"),
    (b'{"texts": []}', 422, "'texts' is empty"),
    (json.dumps({"texts": ["a"] * (MAX_TEXTS + 1)}).encode(), 422, f"at most {MAX_TEXTS}"),
    (b'{"text": "a", "top_k": 0}', 422, "'top_k' must be a positive integer"),
    (json.dumps({"text": "a" * MAX_BODY}).encode(), 413, f"over the {MAX_BODY}-byte limit"),
]


@pytest.mark.parametrize("body, status, detail", BAD, ids=[b[2] for b in BAD])
def test_bad_request_is_a_4xx_json_error(server, body, status, detail):
    _, port, _, _ = server
    got, text = _request(port, "POST", "/predict", body)
    assert (got, detail in json.loads(text)["detail"]) == (status, True), text


def test_clients_that_leave_do_not_block_the_others(server, expected):
    _, port, _, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:  # a body cut short
        s.sendall(b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"text":')
    for _ in range(3):  # a whole request, then gone before the answer
        with socket.create_connection(("127.0.0.1", port)) as s:
            body = json.dumps({"text": TEXTS[1]}).encode()
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
    # a chunked upload with no Content-Length over the limit is refused too
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/predict", body=iter([b"x" * 3000] * 2), encode_chunked=True)
    assert conn.getresponse().status == 413
    status, row = _post(port, {"text": TEXTS[2]})
    assert status == 200
    _assert_row(row, expected)


def test_a_request_queued_past_the_timeout_gets_a_504_and_the_server_goes_on(server, expected):
    """The inference worker is paused (SIGSTOP) while a request waits in the queue for longer than
    `--timeout`: once it runs again, that request is answered 504 with a JSON error, not predicted, and
    the next request is served."""
    proc, port, _, _ = server
    (worker,) = [p for p in _descendants(proc.pid) if b"spawn_main" in _cmdline(p)]
    os.kill(worker, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(_request, port, "POST", "/predict", b'{"text": "late"}')
            time.sleep(TIMEOUT + 1)
            os.kill(worker, signal.SIGCONT)
            status, text = late.result(timeout=60)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert status == 504, text
    detail = json.loads(text)["detail"]
    assert detail.startswith("request timed out: it waited "), detail
    assert detail.endswith(f"s for a worker, over --timeout {TIMEOUT:g} s"), detail
    status, row = _post(port, {"text": TEXTS[1]})
    assert status == 200
    _assert_row(row, expected)


def test_an_idle_server_uses_no_cpu(server):
    """No busy polling while no request comes (LitServe 0.2.19's batched loop polls every millisecond)."""
    proc, _, _, _ = server
    pids = [proc.pid, *_descendants(proc.pid)]
    before = sum(_cpu_ticks(p) for p in pids)
    time.sleep(4)
    ticks = sum(_cpu_ticks(p) for p in pids) - before
    assert ticks < 0.05 * 4 * os.sysconf("SC_CLK_TCK"), f"{ticks} CPU ticks in 4 idle seconds"


def test_sigterm_stops_the_server_and_its_workers(server):
    """SIGTERM to the server's whole process group, as systemd sends it (every process at once; LitServe's
    queue process used to die first, and the shutdown then printed tracebacks)."""
    proc, port, stderr, cwd = server
    children = _descendants(proc.pid)
    assert len(children) >= 2  # at least the inference worker and the HTTP server
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in children if _alive(p)] == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    stderr.seek(0)
    lines = stderr.read().splitlines()
    # the console: one line when ready, one per timed-out request, one when stopped; no 4xx above was
    # logged, no traceback
    assert lines[-1] == "layerfusion serve: stopped", lines
    for line in lines[1:-1]:  # the 504 test's request (when it ran) and nothing else
        assert line.startswith("layerfusion serve: request timed out: it waited "), lines
        assert line.endswith("answered 504 (raise --timeout or --workers, or send less)"), lines
    assert lines[0].startswith("layerfusion serve: ") and f"http://127.0.0.1:{port}" in lines[0]
    assert proc.stdout.read() == "" and sorted(os.listdir(cwd)) == ["stderr.txt"]


def test_a_worker_that_dies_while_loading_stops_the_server(classifier_dir, tmp_path):
    """An inference worker killed while it loads the model (as the OOM killer would) ends the server
    with one error line and exit status 2, instead of a server that waits for it forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerfusion", "serve", str(classifier_dir), "--port", str(port)]
        + ["--device", "cpu"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while not (workers := [p for p in _descendants(proc.pid) if b"spawn_main" in _cmdline(p)]):
            assert proc.poll() is None and time.monotonic() < deadline, "no worker started"
            time.sleep(0.02)
        children = _descendants(proc.pid)  # the worker, LitServe's queue process, ...
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(timeout=60) == 2
        err = proc.stderr.read()
    finally:
        _kill_tree(proc)
    assert err.splitlines()[-1] == (
        "layerfusion: error: an inference worker exited with code -9 while loading the model "
        "(-9: killed, often for lack of memory)"
    ), err
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in children if _alive(p)] == []  # nothing left behind


def test_startup_errors_are_one_line(classifier_dir, tmp_path, capsys):
    from layerfusion.__main__ import main

    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        port, free_port = taken.getsockname()[1], free.getsockname()[1]
        free.close()
        for model, at, problem in [
            (tmp_path / "x.ckpt", free_port, f"checkpoint {tmp_path / 'x.ckpt'} not found"),
            (classifier_dir, port, f"cannot listen on 127.0.0.1:{port}: Address already in use"),
        ]:
            with pytest.raises(SystemExit) as exit_:
                main(["serve", str(model), "--port", str(at)])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and err.startswith(f"layerfusion: error: {problem}"), err
            assert err.count("\n") == 1


# ----------------------------------------------------------------------------- helpers


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _post(port: int, body: dict) -> tuple[int, dict]:
    status, text = _request(port, "POST", "/predict", json.dumps(body).encode())
    return status, json.loads(text)


def _assert_row(row: dict, expected: dict[str, np.ndarray]) -> None:
    p = expected[row["text"]]
    assert row["label"] == LABELS[int(p.argmax())]
    assert list(row["probs"]) == LABELS
    assert list(row["probs"].values()) == pytest.approx(p.tolist(), abs=1e-5)


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        out += kids
        frontier = kids
    return out


def _kill_tree(proc: subprocess.Popen, children: dict[int, str | None] | None = None) -> None:
    """Kill `proc` and the processes under it (`children`: pid -> start time, taken earlier; default:
    those under it now), each only if it is still the same process (not a later reuse of its pid)."""
    if children is None:
        children = {pid: _started(pid) for pid in _descendants(proc.pid)}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid, started in children.items():
        if _alive(pid) and _started(pid) == started:
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _started(pid: int) -> str | None:
    """When the process started (clock ticks after boot): tells a pid apart from a later reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
