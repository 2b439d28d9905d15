"""Shared fixtures: real data paths, tiny random models of each architecture, global-state hygiene."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SECRET = "sk-layerfusion-test-secret-0123456789"
"""A fake API key in the CLI runs' environment (W&B's and the hub's): it must never be written anywhere."""
ARCHS = [
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "mpnet",
    "deberta",
    "deberta-v2",
    "deberta-v2-conv",  # conv_kernel_size > 0 (deberta-v2-xlarge): a convolution after block 0
    "electra",
    "electra-projected",  # embedding_size < hidden_size (electra-small): embeddings projected
    "distilbert",
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
]
"""Every model_type of `ARCHITECTURES`, plus the variants whose hidden states need special taps."""


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Tests must not leak the default dtype, the grad mode or the console log that an in-process CLI
    run installs on the `layerfusion` logger (a later test would see its INFO lines on stderr)."""
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    logger = logging.getLogger("layerfusion")
    _restore_log(logger)  # also after a session fixture's in-process CLI run
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    _restore_log(logger)


def _restore_log(logger: logging.Logger) -> None:
    handlers, level = _PRISTINE_LOG
    logger.handlers[:] = handlers
    logger.setLevel(level)


_PRISTINE_LOG = (
    list(logging.getLogger("layerfusion").handlers),
    logging.getLogger("layerfusion").level,
)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module's in-process work (opt in with `pytestmark =
    pytest.mark.usefixtures("one_thread")`; subprocesses keep their default). What runs there is small
    ops (tiny models, heads, L-BFGS probes) and small extractions: on a busy 2-core machine a second
    thread makes every small op wait for the scheduler. Side by side at load 8-11, the in-process test
    modules took 254 s with one thread and 399 s with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """The real datasets as `{name}/{split}.jsonl`: ../shared/data, else the byte-identical copies bundled in
    the package, decompressed once (a bare clone runs every data test; none is skipped)."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    from layerfusion.data.sources import BUNDLED_DIR, NAMED_DATASETS

    out = tmp_path_factory.mktemp("data")
    for name in NAMED_DATASETS:
        (out / name).mkdir()
        for gz in sorted((BUNDLED_DIR / name).glob("*.jsonl.gz")):
            (out / name / gz.name[: -len(".gz")]).write_bytes(gzip.decompress(gz.read_bytes()))
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 directory (materialised by `make models-test`)."""
    from layerfusion.encoders.offline import resolve_model

    return resolve_model(MINILM)


def tiny_config(arch: str, vocab_size: int):
    """A 2-layer, 32-wide random config of `arch` (an entry of `ARCHS`)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    decoder = dict(**common, num_key_value_heads=2, bos_token_id=101, eos_token_id=102)
    return {
        "bert": lambda: tf.BertConfig(**common),
        "roberta": lambda: tf.RobertaConfig(**common, pad_token_id=0),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**common, pad_token_id=0),
        "camembert": lambda: tf.CamembertConfig(**common, pad_token_id=0),
        "mpnet": lambda: tf.MPNetConfig(**common, pad_token_id=0),
        "deberta": lambda: tf.DebertaConfig(**common),
        "deberta-v2": lambda: tf.DebertaV2Config(**common),
        "deberta-v2-conv": lambda: tf.DebertaV2Config(
            **common,
            conv_kernel_size=3,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
        ),
        "electra": lambda: tf.ElectraConfig(**common, embedding_size=32),
        "electra-projected": lambda: tf.ElectraConfig(**common, embedding_size=16),
        "distilbert": lambda: tf.DistilBertConfig(
            vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64
        ),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=101,
            eos_token_id=102,
        ),
        "llama": lambda: tf.LlamaConfig(**decoder, pad_token_id=0),
        "mistral": lambda: tf.MistralConfig(**decoder, pad_token_id=0),
        "qwen2": lambda: tf.Qwen2Config(**decoder, pad_token_id=0),
        "qwen3": lambda: tf.Qwen3Config(**decoder, head_dim=8, pad_token_id=0),
    }[arch]()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, minilm_dir) -> dict[str, str]:
    """Directories of tiny random models, one per architecture, each with MiniLM's (real) tokenizer."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("tiny")
    vocab = json.loads((Path(minilm_dir) / "config.json").read_text())["vocab_size"]
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        path = root / arch
        AutoModel.from_config(tiny_config(arch, vocab)).save_pretrained(path)
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ):
            if (Path(minilm_dir) / f).exists():
                shutil.copy(Path(minilm_dir) / f, path / f)
        out[arch] = str(path)
    return out


def tiny_pair_specs(tiny_models: dict[str, str]) -> list:
    """A tiny BERT and a tiny GPT-2 (last-token pooling), 32 tokens, fp32: batch composition does not
    change the probabilities (bf16 results depend on a batch's padding)."""
    from layerfusion.encoders.frozen import EncoderSpec

    return [
        EncoderSpec(tiny_models["bert"], max_length=32, alias="bert", compute_dtype="float32"),
        EncoderSpec(
            tiny_models["gpt2"],
            pooling="last",
            max_length=32,
            alias="gpt2",
            compute_dtype="float32",
        ),
    ]


@pytest.fixture
def sst2_slice(tmp_path, shared_data) -> Path:
    """A small local dataset directory cut from the real SST-2 (train 200, dev 80, test 80)."""
    out = tmp_path / "sst2_slice"
    out.mkdir()
    for split, n in (("train", 200), ("dev", 80), ("test", 80)):
        lines = (
            (shared_data / "sst2" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        )
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def run_script(source: str, *args: str, tmp_path: Path, timeout: float = 300) -> None:
    """Write `source` to a script in `tmp_path` and run it offline in a fresh Python process (one that
    launches its own ranks, as a user's script does); fail with its stderr tail unless it exits 0."""
    script = tmp_path / "probe.py"
    script.write_text(source)
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def gloo_ranks(script: Path, *args: str, world: int = 2, timeout: float = 300) -> list[str]:
    """Run `script` (which joins a Gloo group from the environment) as `world` real processes; each
    rank's stdout, after every rank exited 0 (else their stderr tails)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env={**env, "RANK": str(r), "WORLD_SIZE": str(world)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [out for out, _ in outs]


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m layerfusion ...` in a subprocess with the hub offline and `env` added."""
    proc = subprocess.run(
        [sys.executable, "-m", "layerfusion", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"layerfusion {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def minilm_config(tmp_path_factory, shared_data) -> Path:
    """A directory with `full.yaml`: the quickstart config (W&B offline logger, checkpoints, run reports)
    with MiniLM alone (64 tokens, float32 compute and cache) on SST-2 (400 train / 120 dev / 120 test rows, 4 epochs)
    plus the LayerImportance and LayerSelection (top 3) callbacks, completed by `fit --print_config`.
    Its runs write to `<dir>/run` and cache features in `<dir>/cache`."""
    import yaml

    from layerfusion.cli import cli_main

    d = tmp_path_factory.mktemp("cli")
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    # fp32 compute: `auto` is bf16 on CPUs with bf16 units, whose results depend on the batch's padding
    cfg["model"]["encoders"] = [{"name": MINILM, "max_length": 64, "compute_dtype": "float32"}]
    cfg["model"]["cache_dir"] = str(d / "cache")
    cfg["model"]["cache_dtype"] = (
        "float32"  # predict's features then equal the Classifier's online ones
    )
    cfg["data"].update(
        dataset="sst2", data_dir=str(shared_data), max_train_samples=400, max_eval_samples=120
    )
    cfg["trainer"]["max_epochs"] = 4
    cfg["trainer"]["callbacks"][:0] = [
        {
            "class_path": "layerfusion.callbacks.LayerImportance",
            "init_args": {"attention_samples": 32},
        },
        {
            "class_path": "layerfusion.callbacks.LayerSelection",
            "init_args": {"strategy": "top_k", "k": 3},
        },
    ]
    (d / "small.yaml").write_text(yaml.safe_dump(cfg).replace("runs/quickstart", str(d / "run")))
    # --print_config only parses: in this process (no `import lightning` of its own to pay for)
    full = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(full):
        mp.chdir(d)
        mp.setattr(sys, "argv", ["layerfusion"])  # the CLI's arguments are `args`, not pytest's
        with pytest.raises(SystemExit) as done:
            cli_main(["fit", "--config", "small.yaml", "--print_config"])
    assert done.value.code in (0, None)
    (d / "full.yaml").write_text(full.getvalue())
    assert yaml.safe_load(full.getvalue())["model"]["head"] == "gated"
    return d


@dataclass(frozen=True)
class CliRun:
    """A finished `fit` and `test` of the real CLI: the directory they ran in and what each printed."""

    dir: Path
    fit: subprocess.CompletedProcess
    test: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def minilm_run(minilm_config) -> CliRun:
    """`make fit` in small, once for the session (test_cli checks what it wrote, test_console what it
    printed): `fit --config full.yaml` (see `minilm_config`), then `test` on its best checkpoint, each a
    `python -m layerfusion` process with W&B offline and `SECRET` as the W&B and hub keys."""
    d = minilm_config
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET}
    fit = run_cli("fit", "--config", "full.yaml", cwd=d, env=env)
    best = d / "run" / "checkpoints" / "best.ckpt"
    test = run_cli("test", "--config", "full.yaml", "--ckpt_path", str(best), cwd=d, env=env)
    return CliRun(d, fit, test)
