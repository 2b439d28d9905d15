"""Peak RSS of the `predict` subcommand on a 10k-row and a 100k-row JSON Lines file: does memory grow
with the file?

    python benchmarks/predict_memory.py [--quick] [--modes online,cached,cached_warm]
        [--model minilm|tiny] [--rows SMALL LARGE] [--out benchmarks/predict_memory.json]

A head over all-MiniLM-L6-v2 (layers 4..6) is fitted on 512 SST-2 rows, once per feature mode (`predict`
takes the mode from the checkpoint); then each (rows, mode) runs `python -m layerfusion predict`
in-process in a fresh worker, on `rows` sentences drawn with replacement (seeded) from `sst2_glue` train,
and reports the worker's peak RSS (VmHWM) and wall time. `online` runs the encoder on every batch;
`cached` first extracts the file's selected layers into the feature cache (a temporary directory: cold),
which a memory map then serves, so its peak includes the extraction and the mapped features it touched
(they grow with the file by design); `cached_warm` predicts the same file again from that entry.
`--model tiny` swaps MiniLM for a 2-layer, 32-wide random BERT with its tokenizer (layers 1..2): the same
data, writer and cache path at almost no encoder cost. Figures: `predict_rss_ratio_<mode>` = peak RSS at
the large size / at the small size; `predict_loop_rss_ratio_<mode>` = the same for the peak of the predict
loop alone (after data, model and features are ready; the peak is reset as the loop starts). Run as
`python benchmarks/predict_memory.py --worker '<json>'` it is the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import yaml

from layerfusion.memory import proc_status_bytes, reset_peak_rss

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ROWS = {False: (10_000, 100_000), True: (500, 5_000)}
"""(small, large) predict rows, full and quick mode."""
LAYERS = {"minilm": [4, 5, 6], "tiny": [1, 2]}
MODES = ("online", "cached", "cached_warm")
"""`online`: encoders every batch; `cached`: cold cache (extraction included); `cached_warm`: the same
file again, features read from the cache entry `cached` wrote."""


def bench_predict_memory(
    quick: bool,
    threads: int,
    workdir: Path,
    modes: tuple[str, ...] = MODES,
    model: str = "minilm",
    rows: tuple[int, int] | None = None,
) -> dict:
    """`predict_rss_ratio_<mode>` for each mode, with the peaks, wall times and sizes in `raw`; `model`:
    `minilm`, or `tiny` (a 2-layer random BERT with MiniLM's tokenizer: the same pipeline, almost no
    encoder cost); `rows`: (small, large) instead of the mode's default."""
    workdir.mkdir(parents=True, exist_ok=True)
    encoder = MINILM if model == "minilm" else tiny_model(workdir / "tiny-bert")
    # one head per feature mode: `predict` takes `model.features` from the checkpoint's hyperparameters
    # (LightningCLI applies them over the command line), so the mode is chosen at fit time
    configs, fits = {}, {}
    for features in sorted({m.removesuffix("_warm") for m in modes}):
        configs[features] = write_config(workdir, features, encoder, LAYERS[model])
        fits[features] = run(
            [sys.executable, "-m", "layerfusion", "fit", "--config", str(configs[features])],
            workdir,
            f"fit ({features})",
        )
    texts = [json.loads(line) for line in data_file("sst2_glue", "train").open(encoding="utf-8")]
    small, large = rows or ROWS[quick]
    runs: dict[str, dict[int, dict]] = {m: {} for m in modes}
    for n in (small, large):
        drawn = random.Random(n).choices(texts, k=n)
        path = workdir / f"predict-{n}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in drawn), encoding="utf-8")
        for mode in modes:
            features = mode.removesuffix("_warm")
            args = {
                "config": str(configs[features]),
                "ckpt": str(workdir / features / "checkpoints" / "last.ckpt"),
                "predict_path": str(path),
                "threads": threads,
                "cwd": str(workdir),
            }
            result = run_worker(args)
            out = workdir / features / "predictions.jsonl"
            with out.open(encoding="utf-8") as fh:
                written = sum(1 for _ in fh)
            if written != n:
                raise RuntimeError(f"predict {mode} on {n} rows wrote {written} rows to {out}")
            runs[mode][n] = result
            mib = {k: v / 2**20 for k, v in result.items() if k.endswith("_bytes")}
            print(
                f"predict {mode:12s} {n:>7,} rows: peak RSS {mib['peak_rss_bytes']:6.0f} MiB (before "
                f"the loop {mib['setup_peak_rss_bytes']:.0f}, loop {mib['loop_peak_rss_bytes']:.0f} "
                f"from {mib['rss_at_loop_start_bytes']:.0f}), {result['wall_seconds']:.0f} s",
                file=sys.stderr,
            )
    figures = {}
    for m in modes:
        big, little = runs[m][large], runs[m][small]
        figures[f"predict_rss_ratio_{m}"] = big["peak_rss_bytes"] / little["peak_rss_bytes"]
        figures[f"predict_loop_rss_ratio_{m}"] = (
            big["loop_peak_rss_bytes"] / little["loop_peak_rss_bytes"]
        )
    return {
        **figures,
        "raw": {
            "rows": [small, large],
            "model": MINILM if model == "minilm" else "tiny random BERT (2 layers, 32 wide)",
            "layers": LAYERS[model],
            "source": "sst2_glue train sentences, drawn with replacement (seed = rows)",
            "measure": "VmHWM of a fresh worker process running the predict subcommand in-process",
            "fit_seconds": fits,
            "runs": {m: {str(n): r for n, r in rs.items()} for m, rs in runs.items()},
        },
    }


def write_config(workdir: Path, features: str, encoder: str, layers: list[int]) -> Path:
    """The quickstart config reduced to one encoder, fixed layers, 512 train rows, one epoch, no logger;
    its run directory is `workdir/<features>`."""
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["encoders"] = [
        {"name": encoder, "pooling": "mean", "max_length": 128, "alias": "encoder"}
    ]
    cfg["model"]["layers"] = {"encoder": layers}
    cfg["model"]["cache_dir"] = str(workdir / "cache")
    cfg["model"]["features"] = features
    cfg["data"].update(dataset="sst2", max_train_samples=512, max_eval_samples=256)
    cfg["trainer"].update(max_epochs=1, logger=False)
    keep = ("ModelCheckpoint", "PredictionWriter")
    cfg["trainer"]["callbacks"] = [
        c
        for c in cfg["trainer"]["callbacks"]
        if c["class_path"].endswith(keep) and c.get("init_args", {}).get("filename") != "best"
    ]
    path = workdir / f"predict_memory_{features}.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("runs/quickstart", str(workdir / features)))
    return path


def tiny_model(path: Path) -> str:
    """A 2-layer, 32-wide random BERT with all-MiniLM-L6-v2's tokenizer, saved at `path`."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from layerfusion.encoders.offline import resolve_model

    source = Path(resolve_model(MINILM))
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return str(path)


def data_file(dataset: str, split: str) -> Path:
    """A split of the offline data (../shared/data, else the copy bundled with the package)."""
    shared = REPO.parent / "shared" / "data" / dataset / f"{split}.jsonl"
    if shared.is_file():
        return shared
    import gzip

    from layerfusion.data.sources import BUNDLED_DIR

    out = Path(tempfile.mkdtemp(prefix="lf-data-")) / dataset / f"{split}.jsonl"
    out.parent.mkdir(parents=True)
    out.write_bytes(gzip.decompress((BUNDLED_DIR / dataset / f"{split}.jsonl.gz").read_bytes()))
    return out


def run(cmd: list[str], cwd: Path, what: str) -> float:
    """Run `cmd`; its wall seconds (its stderr on failure)."""
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def run_worker(args: dict) -> dict:
    """One predict in a fresh worker process; its measurements. Started through `sh` (which forks it)
    so that its peak RSS does not start from this process's (Linux copies the parent's peak into a
    child that execs right after vfork)."""
    cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, __file__, "--worker"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [*cmd, json.dumps(args)], cwd=args["cwd"], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"predict worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(args: dict) -> dict:
    """`layerfusion predict` in this process; its peak RSS and wall time, and the peak of the predict loop
    alone (measured by `LoopPeak`)."""
    import predict_memory  # the CLI instantiates `predict_memory.LoopPeak`, not `__main__.LoopPeak`
    import torch

    from layerfusion.cli import cli_main

    torch.set_num_threads(args["threads"])
    start = time.perf_counter()
    cli_main(
        [
            "predict",
            "--config",
            args["config"],
            "--ckpt_path",
            args["ckpt"],
            "--data.predict_path",
            args["predict_path"],
            "--trainer.callbacks+=predict_memory.LoopPeak",
        ]
    )
    figures = predict_memory.LoopPeak.figures
    return {
        "peak_rss_bytes": max(figures["setup_peak_rss_bytes"], figures["loop_peak_rss_bytes"]),
        **figures,
        "final_rss_bytes": proc_status_bytes("VmRSS"),
        "wall_seconds": time.perf_counter() - start,
    }


class LoopPeak(L.Callback):
    """Peak RSS of the process up to the predict loop (data read, model loaded, features extracted), and of
    the loop alone: the peak is reset when the loop starts (`clear_refs`). Figures in `LoopPeak.figures`."""

    figures: dict = {}

    def on_predict_start(self, trainer, pl_module) -> None:
        LoopPeak.figures["setup_peak_rss_bytes"] = proc_status_bytes("VmHWM")
        LoopPeak.figures["rss_at_loop_start_bytes"] = proc_status_bytes("VmRSS")
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")

    def on_predict_end(self, trainer, pl_module) -> None:
        LoopPeak.figures["loop_peak_rss_bytes"] = proc_status_bytes("VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{ROWS[True]} rows instead of {ROWS[False]}"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--rows", type=int, nargs=2, help="(small, large) predict rows")
    parser.add_argument("--out", default=str(HERE / "predict_memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {MODES}")
    with tempfile.TemporaryDirectory(prefix="lf-bench-predict-") as tmp:
        results = bench_predict_memory(
            args.quick, args.threads, Path(tmp), modes, args.model, args.rows
        )
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for key, value in results.items():
        if key != "raw":
            print(f"{key:30s} {value:8.3f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
