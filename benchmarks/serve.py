"""`layerfusion serve` under load, beside the in-process `Classifier` at the same batch size.

    python benchmarks/serve.py [--model CKPT_OR_DIR] [--clients 1,4,16] [--requests 128] [--rounds 3]
        [--batch-timeout 0] [--soak 1024] [--out benchmarks/serve.json]

Starts `python -m layerfusion serve` on 127.0.0.1 (a free port; `--device cpu --max-batch-size 16`, one
worker, its default threads and `--batch-timeout 0` unless given), then for each client count N,
`--rounds` times, alternating: N client threads (one keep-alive HTTP connection each) send `--requests`
single-sentence requests in all, SST-2 test sentences in order, each client waiting for its answer before
sending its next; and the in-process `Classifier.predict_proba` on the same sentences in chunks of N in
the same order (the batches the server can form at best), once with torch's default threads (the CPU's
cores: what a user gets) and once with the server worker's threads. Figures per N: throughput ratio
server / in-process (per round, median) against each, p50/p95/p99 latency of the server's requests,
failed requests (an error or a status other than 200; the soak's counted too), the share of labels
equal to the in-process ones (bf16 results depend on a batch's padding). Memory: the server's PSS and RSS (its process tree, summed;
PSS counts a page shared by forked processes once, RSS in each) when ready, after the warm-up, at the
end of the measured rounds, then every 128 requests of a `--soak` of 16 clients: whether it levels off.
`met` checks each target for every configuration: 0 failed requests; >= 0.8 x in-process at 16 clients
against both thread counts; <= 5 % growth of PSS and of RSS from ready and from the warm-up to the end
of the rounds, from ready to the end of the soak, and over the soak's second half. Also
a LitServe hello-world (the same loop and settings, a model that returns at once) under the same
clients: the floor of the HTTP and queue path on this machine. Loopback only; stops by itself. Without
`--model`, the classifier is all-MiniLM-L6-v2 (layers 4, 5, 6; `compute_dtype` auto) under a seeded
untrained gated head: throughput does not depend on the head's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import litserve as ls
import numpy as np
import torch
from benchutil import MINILM, REPO, alternate, data_dir, log, machine_info, median, round_ratios

from layerfusion.classifier import FORMAT, VERSION, Classifier
from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
from layerfusion.encoders.offline import no_loading_bars, resolve_model
from layerfusion.fusion.heads import build_head
from layerfusion.serve import BlockingBatchedLoop, ClassifierServer, default_threads


class HelloAPI(ls.LitAPI):
    """A model that answers at once: what is left is LitServe's HTTP and queue path."""

    def setup(self, device: str) -> None:
        pass

    def decode_request(self, request):
        return request["text"]

    def predict(self, batch):
        return [{"text": t, "label": "0"} for t in batch]

    def encode_response(self, output):
        return output


SERVER_ARGS = ["--device", "cpu", "--max-batch-size", "16"]
TARGETS = {"failed": 0, "throughput_ratio_16_clients": 0.8, "rss_growth": 0.05}
SOAK_BLOCK = 128


def main() -> None:
    """Run the load benchmark and write its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", help="a .ckpt or classifier folder (default: MiniLM, untrained head)"
    )
    parser.add_argument("--clients", default="1,4,16", help="client counts (default: 1,4,16)")
    parser.add_argument(
        "--requests", type=int, default=128, help="requests per client count and round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--batch-timeout", default="0", help="the server's (default: 0 s)")
    parser.add_argument("--soak", type=int, default=1024, help="requests of the memory soak")
    parser.add_argument("--hello-server", type=int, help=argparse.SUPPRESS)  # internal: the floor
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "serve.json"))
    args = parser.parse_args()
    if args.hello_server:
        hello_server(args.hello_server, float(args.batch_timeout))
        return
    clients = [int(c) for c in args.clients.split(",")]
    texts = [json.loads(line)["text"] for line in (data_dir() / "sst2" / "test.jsonl").open()]
    texts = texts[: args.requests]
    server_args = SERVER_ARGS + ["--batch-timeout", args.batch_timeout]
    threads = {"default": torch.get_num_threads(), "server": default_threads(1)}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(minilm_classifier(Path(tmp) / "clf"))
        clf = load(model)
        labels = [clf.label_names[i] for i in np.asarray(clf.predict_proba(texts)).argmax(1)]
        results = {"machine": machine_info(), "model": describe_model(args.model, clf)}
        results["machine"]["load_average_at_start"] = os.getloadavg()
        with Server(["-m", "layerfusion", "serve", model, *server_args]) as server:
            memory = {"ready": server.memory()}
            for n in clients:  # warm-up: every batch size once, not counted
                run_clients(server.port, texts[: 4 * n], n)
            memory["after_warmup"] = server.memory()
            per_n = {}
            for n in clients:
                log(f"{n} client(s): {args.rounds} rounds of {len(texts)} requests")
                per_n[str(n)] = measure(server.port, clf, texts, labels, n, args.rounds, threads)
                log(f"{n} client(s): {json.dumps(per_n[str(n)])}")
            memory["end"] = server.memory()
            soak, soak_failed = [memory["end"]], 0
            for i in range(0, args.soak, SOAK_BLOCK):
                block = [texts[(i + j) % len(texts)] for j in range(SOAK_BLOCK)]
                soak_failed += run_clients(server.port, block, 16)["failed"]
                soak.append(server.memory())
            log(f"soak PSS: {[round(v['pss'] / 2**20) for v in soak]} MiB")
        floor = {}
        hello_argv = [str(Path(__file__).resolve()), "--batch-timeout", args.batch_timeout]
        with Server(hello_argv, port_flag="--hello-server") as hello:
            for n in clients:
                run_clients(hello.port, texts[: 4 * n], n)
                runs = [run_clients(hello.port, texts, n) for _ in range(args.rounds)]
                floor[str(n)] = {
                    "requests_per_s": round(median([len(texts) / r["seconds"] for r in runs]), 1),
                    "latency_ms_p50": round(
                        float(np.percentile(np.concatenate([r["latencies"] for r in runs]), 50))
                        * 1000,
                        2,
                    ),
                    "failed": sum(r["failed"] for r in runs),
                }
            log(f"hello-world floor: {json.dumps(floor)}")
    results["machine"]["load_average_at_end"] = os.getloadavg()
    half = len(soak) // 2
    points = {
        "ready_to_end_of_rounds": ("ready", "end"),
        "warmup_to_end_of_rounds": ("after_warmup", "end"),
        "ready_to_end_of_soak": ("ready", None),
        "soak_second_half": (half, None),
    }
    growth = {
        kind: {
            name: round(_at(memory, soak, b, kind) / _at(memory, soak, a, kind) - 1, 4)
            for name, (a, b) in points.items()
        }
        for kind in ("pss", "rss")
    }
    ratios = {
        f"throughput_ratio_16_clients_{k}": per_n["16"][f"throughput_ratio{suffix}"] >= 0.8
        for k, suffix in (("default_threads", ""), ("same_threads", "_same_threads"))
        if "16" in per_n
    }
    results.update(
        settings={
            "server_args": server_args,
            "server_threads": threads["server"],
            "in_process_threads": threads,
            "requests_per_round": len(texts),
            "rounds": args.rounds,
            "soak_requests": args.soak,
            "texts": "SST-2 test sentences, in file order, one per request",
            "in_process": "Classifier.predict_proba on chunks of N sentences in the same order",
        },
        clients=per_n,
        hello_world_floor=floor,
        server_memory_mib={
            kind: {k: round(v[kind] / 2**20, 1) for k, v in memory.items()}
            for kind in ("pss", "rss")
        },
        soak_failed=soak_failed,
        soak_memory_mib={
            kind: [round(v[kind] / 2**20, 1) for v in soak] for kind in ("pss", "rss")
        },
        memory_growth=growth,
        targets=TARGETS,
        met={
            "failed": soak_failed == 0 and all(r["failed"] == 0 for r in per_n.values()),
            **ratios,
            **{
                f"{kind}_growth_{name}": value <= TARGETS["rss_growth"]
                for kind, values in growth.items()
                for name, value in values.items()
            },
        },
    )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    keys = ("clients", "hello_world_floor", "server_memory_mib", "memory_growth", "met")
    print(json.dumps({k: results[k] for k in keys}, indent=2))


def measure(port, clf, texts, labels, n, rounds, threads) -> dict:
    """Server and in-process (both thread counts) alternating for `rounds`: the figures of N clients."""
    runs: list[dict] = []

    def over_http() -> float:
        run = run_clients(port, texts, n)
        runs.append(run)
        return run["seconds"]

    def in_process(threads: int) -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for i in range(0, len(texts), n):
            clf.predict_proba(texts[i : i + n])
        return time.perf_counter() - start

    variants = {
        "server": over_http,
        "in_process": lambda: in_process(threads["default"]),
        "in_process_server_threads": lambda: in_process(threads["server"]),
    }
    times = alternate(variants, rounds)
    latencies = np.concatenate([r["latencies"] for r in runs]) * 1000
    answered = [(g, w) for r in runs for g, w in zip(r["labels"], labels) if g]
    return {
        "throughput_ratio": median(round_ratios(times["in_process"], times["server"])),
        "throughput_ratio_same_threads": median(
            round_ratios(times["in_process_server_threads"], times["server"])
        ),
        "server_texts_per_s": median([len(texts) / t for t in times["server"]]),
        "in_process_texts_per_s": median([len(texts) / t for t in times["in_process"]]),
        "in_process_server_threads_texts_per_s": median(
            [len(texts) / t for t in times["in_process_server_threads"]]
        ),
        "latency_ms": {f"p{q}": round(float(np.percentile(latencies, q)), 2) for q in (50, 95, 99)},
        "requests": len(latencies),
        "failed": int(sum(r["failed"] for r in runs)),
        "label_agreement_with_in_process": round(
            sum(g == w for g, w in answered) / max(1, len(answered)), 4
        ),
    }


def hello_server(port: int, batch_timeout: float) -> None:
    """The floor: LitServe with `layerfusion serve`'s loop and server class, and a model doing nothing."""
    api = HelloAPI(max_batch_size=16, batch_timeout=batch_timeout, loop=BlockingBatchedLoop())
    server = ClassifierServer(api, accelerator="cpu", timeout=30)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


def minilm_classifier(folder: Path) -> Path:
    """A saved classifier: a seeded, untrained gated head over MiniLM's layers 4, 5, 6."""
    spec = EncoderSpec(resolve_model(MINILM), alias="minilm")
    with no_loading_bars():
        encoder = FrozenEncoder(spec)
    layers = {"minilm": [4, 5, 6]}
    torch.manual_seed(0)
    head = build_head(
        "gated",
        dims={"minilm": encoder.hidden_size},
        num_layers={"minilm": encoder.num_layers},
        layers=layers,
        num_classes=2,
    )
    config = {
        "format": FORMAT,
        "version": VERSION,
        "label_names": ["0", "1"],
        "head": "gated",
        "head_args": {},
        "layers": layers,
        "encoders": [dataclasses.asdict(spec)],
        "encoder_ids": {"minilm": encoder.identity()},
    }
    return Classifier(config, head.state_dict(), device="cpu").save(folder)


def load(model: str) -> Classifier:
    """The classifier in-process, on the CPU with the torch threads the server's one worker gets."""
    torch.set_num_threads(os.cpu_count() or 1)
    path = Path(model)
    return (Classifier.load if path.is_dir() else Classifier.from_checkpoint)(path, device="cpu")


def describe_model(given: str | None, clf: Classifier) -> dict:
    """What was served."""
    return {
        "given": given,
        "encoders": {k: e.spec.name for k, e in clf.encoders.items()},
        "layers": clf.layers,
        "compute_dtype": {k: e.compute_precision("cpu") for k, e in clf.encoders.items()},
        "head": clf.config["head"] + ("" if given else " (seeded, untrained)"),
        "labels": clf.label_names,
    }


def run_clients(port: int, texts: list[str], clients: int) -> dict:
    """`clients` threads send `texts` (one per request) until all are answered: seconds, latencies, labels."""
    labels: list[str | None] = [None] * len(texts)
    latencies: list[float] = [0.0] * len(texts)
    failed = [0] * clients
    next_index = iter(range(len(texts)))
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            body = json.dumps({"text": texts[i]})
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                latencies[i] = time.perf_counter() - start
                if response.status == 200:
                    labels[i] = json.loads(payload)["label"]
                else:
                    failed[c] += 1
            except (OSError, http.client.HTTPException, ValueError):
                failed[c] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "latencies": np.array(latencies),
        "labels": labels,
        "failed": sum(failed),
    }


class Server:
    """`python ARGV --port PORT` (a free port of 127.0.0.1), from ready to SIGTERM."""

    def __init__(self, argv: list[str], port_flag: str = "--port") -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [sys.executable, *argv, port_flag, str(self.port)]

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise SystemExit("the server was not ready within 300 s")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)

    def memory(self) -> dict[str, int]:
        """Bytes of the server's process tree (main, HTTP server, manager, inference worker), summed:
        `pss` (a page shared by forked processes counted once) and `rss` (counted in each)."""
        tree = [_smaps(p) for p in [self.proc.pid, *_descendants(self.proc.pid)]]
        return {kind: sum(m.get(kind, 0) for m in tree) for kind in ("pss", "rss")}


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except OSError:
                continue
    out, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        out += frontier
    return out


def _smaps(pid: int) -> dict[str, int]:
    """Bytes resident (`rss`) and proportional (`pss`: each shared page split among its processes)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _at(memory: dict, soak: list, point, kind: str) -> int:
    """Memory of `kind` at a named point, a soak index, or (None) the end of the soak."""
    value = memory[point] if isinstance(point, str) else soak[-1 if point is None else point]
    return value[kind]


if __name__ == "__main__":
    main()
