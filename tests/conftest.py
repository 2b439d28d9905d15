"""Shared fixtures: real data paths, tiny random models of each architecture, global-state hygiene."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
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
    """Tests must not leak the default dtype or the grad mode."""
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


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
