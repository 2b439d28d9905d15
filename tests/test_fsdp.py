"""FSDP: the wrap policy (every block of every supported architecture is its own unit, the head is not
in one), and FSDP for real on 2 CPU processes (Gloo) through the CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MINILM, REPO
from ddp_probe import collectives_nccl_accepts
from torch import nn

from layerfusion.encoders.frozen import ARCHITECTURES
from layerfusion.strategies import FrozenEncoderFSDPStrategy, block_classes


def _tiny(model_type: str) -> nn.Module:
    """A random 2-block, 32-wide model of `model_type` (config attribute maps cover GPT-2 / DistilBERT names)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    return AutoModel.from_config(config).requires_grad_(False)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_policy_wraps_every_block_of_every_architecture(model_type):
    encoder = _tiny(model_type)
    _, blocks_path, _ = ARCHITECTURES[model_type]
    blocks = list(encoder.get_submodule(blocks_path))
    assert len(blocks) == 2
    model = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(32, 2)})
    policy = FrozenEncoderFSDPStrategy().kwargs["auto_wrap_policy"]
    # what FSDP itself calls to choose the modules it wraps (FSDP needs an accelerator; the policy does not)
    wrapped = set(policy._run_policy(model, set(), {})) - {model}
    assert {id(m) for m in wrapped} == {id(b) for b in blocks}, (
        f"{model_type}: wraps {sorted(type(m).__name__ for m in wrapped)}, blocks are {type(blocks[0]).__name__}"
    )
    # so the trainable head stays in the root unit, apart from every frozen block
    assert not any(model["head"] is m for w in wrapped for m in w.modules())


def test_block_classes_come_from_the_architecture_table():
    found = block_classes()
    assert found == {type(_tiny(t).get_submodule(ARCHITECTURES[t][1])[0]) for t in ARCHITECTURES}
    names = {c.__name__ for c in found}
    assert {
        "XLMRobertaLayer",
        "CamembertLayer",
        "DebertaLayer",
        "ElectraLayer",
        "Qwen3DecoderLayer",
    } <= names
    with pytest.raises(ValueError, match="cannot import 'nope.Block'"):
        FrozenEncoderFSDPStrategy(wrap_classes=["nope.Block"])
    from transformers.models.bert.modeling_bert import BertLayer

    explicit = FrozenEncoderFSDPStrategy(
        wrap_classes=["transformers.models.bert.modeling_bert.BertLayer"]
    ).kwargs["auto_wrap_policy"]
    assert set(explicit._lambda_fn.block_types) == {BertLayer}


# -- 2 CPU processes (Gloo): FSDP for real -------------------------------------------------------


def _bf16_llama(d: Path, minilm_dir: str) -> Path:
    """A tiny random Llama saved in bf16 (the dtype a 7B decoder is loaded in), with MiniLM's tokenizer."""
    from conftest import tiny_config
    from transformers import AutoModel

    path = d / "llama-bf16"
    vocab = json.loads((Path(minilm_dir) / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("llama", vocab)).to(torch.bfloat16).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (Path(minilm_dir) / f).exists():
            shutil.copy(Path(minilm_dir) / f, path / f)
    return path


def _fsdp_config(d: Path, shared_data: Path, llama: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["encoders"] = [
        {"name": MINILM, "max_length": 32, "compute_dtype": "float32"},
        {"name": str(llama), "max_length": 32, "pooling": "last", "torch_dtype": "bfloat16"},
    ]
    cfg["model"].update(cache_dir=str(d / "cache"), cache_chunk_rows=8, cache_dtype="float32")
    # 40 train rows; 21 val / test rows: not divisible by the 2 ranks
    cfg["data"].update(
        dataset="sst2",
        data_dir=str(shared_data),
        batch_size=8,
        max_train_samples=40,
        max_eval_samples=21,
    )
    cfg["trainer"].update(
        max_epochs=1,
        devices=2,
        strategy={"class_path": "layerfusion.strategies.FrozenEncoderFSDPStrategy"},
    )
    cfg["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs/quickstart", "name": "logs"},
    }
    cfg["trainer"]["callbacks"] = [
        c
        for c in cfg["trainer"]["callbacks"]
        if "EarlyStopping" not in c["class_path"] and "ResourceMonitor" not in c["class_path"]
    ]
    cfg["trainer"]["callbacks"].append(
        {"class_path": "ddp_probe.RecordCollectives", "init_args": {"out": str(d / "probe")}}
    )
    path = d / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("runs/quickstart", str(d / "run")))
    return path


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_fit_test_predict_match_one_process(
    tmp_path, shared_data, minilm_dir, monkeypatch
):
    """FSDP over 2 Gloo ranks with MiniLM (fp32) beside a bf16 Llama: fit (cached) writes a head-only
    checkpoint; a fresh `test` (online: each encoder its own FSDP unit) and a fresh `predict` (cached:
    the predict split is extracted cold, after the restore) with `--ckpt_path` give exactly what one
    process gives on that checkpoint, and the checkpoint's encoder hashes are one process's."""
    llama = _bf16_llama(tmp_path, minilm_dir)
    cfg = _fsdp_config(tmp_path, shared_data, llama)
    run = tmp_path / "run"
    fit = _run_cli("fit", "--config", str(cfg), cwd=tmp_path)
    assert "distributed_backend=gloo" in fit.stderr and "Starting with 2 processes" in fit.stderr
    ops = {
        c["op"]
        for c in json.loads((tmp_path / "probe" / "collectives-fit-rank0.json").read_text())[
            "calls"
        ]
    }
    # the cache build (object broadcasts), FSDP's parameter all-gathers, metric syncs
    assert {"broadcast_object_list", "all_reduce"} <= ops and ops & {
        "all_gather",
        "all_gather_into_tensor",
    }, ops
    assert collectives_nccl_accepts(tmp_path / "probe", "fit") > 0

    best = run / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("head.") for k in ckpt["state_dict"])
    # the weights hash written under FSDP is the unwrapped encoder's (one process, no FSDP)
    from layerfusion.encoders.frozen import FrozenEncoder

    for spec in _encoders(cfg):
        assert (
            ckpt["layerfusion"]["encoders"][spec.key]["weights_sha256"]
            == FrozenEncoder(spec).fingerprint()
        ), spec.key
    assert str(next(FrozenEncoder(_encoders(cfg)[1]).model.parameters()).dtype) == "torch.bfloat16"

    rows_alone = ["--data.batch_size", "1"]  # the same shapes on 2 ranks and on 1
    # predict under FSDP, cached: no entry of the test split exists yet, it is extracted after restore
    assert not list((tmp_path / "cache").rglob("test-*"))
    _run_cli("predict", "--config", str(cfg), "--ckpt_path", str(best), *rows_alone, cwd=tmp_path)
    assert len(list((tmp_path / "cache").rglob("test-*"))) == 2  # one entry per encoder
    fsdp_rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    # test under FSDP, online: each encoder its own FSDP unit, run every step (Lightning takes
    # `features` from the checkpoint's hyper-parameters: the same head, saved as an online run's)
    ckpt["hyper_parameters"]["features"] = "online"
    online_ckpt = tmp_path / "online.ckpt"
    torch.save(ckpt, online_ckpt)
    two = _run_cli(
        "test", "--config", str(cfg), "--ckpt_path", str(online_ckpt), *rows_alone, cwd=tmp_path
    )
    assert "encoder llama" in two.stderr and "extracted" not in two.stderr  # nothing cached: online
    fsdp_test = json.loads((run / "metrics_test.json").read_text())
    for stage in ("predict", "test"):
        assert collectives_nccl_accepts(tmp_path / "probe", stage) > 0

    # one process on the same checkpoint
    one_test = _one_process("test", cfg, online_ckpt, monkeypatch, *rows_alone)
    _one_process("predict", cfg, best, monkeypatch, *rows_alone)
    one_rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert fsdp_test["rows"] == one_test["rows"] == 21
    for metric in ("test_acc", "test_f1", "test_loss"):
        assert fsdp_test[metric] == pytest.approx(one_test[metric], abs=1e-5), metric
    assert len(fsdp_rows) == len(one_rows) == 21
    for a, b in zip(fsdp_rows, one_rows, strict=True):
        assert a["text"] == b["text"] and a["label"] == b["label"]
        assert list(a["probs"].values()) == pytest.approx(list(b["probs"].values()), abs=1e-5)
    assert "test_acc" in two.stdout

    # the FSDP checkpoint loads into the inference API too
    from layerfusion import Classifier

    clf = Classifier.from_checkpoint(best)
    probs = clf.predict_proba([r["text"] for r in one_rows[:3]])
    for got, want in zip(probs.tolist(), one_rows[:3], strict=True):
        assert got == pytest.approx([want["probs"][c] for c in clf.label_names], abs=1e-4)


def _encoders(cfg: Path) -> list:
    from layerfusion.encoders.frozen import EncoderSpec

    return [EncoderSpec(**e) for e in yaml.safe_load(cfg.read_text())["model"]["encoders"]]


def _run_cli(*args: str, cwd: Path):
    """The CLI in a subprocess with the test-only `ddp_probe` callbacks importable."""
    import os

    from conftest import run_cli

    path = os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
    )
    return run_cli(*args, cwd=cwd, env={"PYTHONPATH": path})


def _one_process(stage: str, cfg: Path, ckpt: Path, monkeypatch, *args: str) -> dict:
    """`stage` of `ckpt` in this process on one CPU device, no FSDP; its metrics file (test) or {}."""
    from layerfusion.cli import cli_main

    with monkeypatch.context() as m:
        m.chdir(cfg.parent)
        m.setattr(sys, "argv", ["layerfusion"])
        single = ["--trainer.devices", "1", "--trainer.strategy", "auto", "--ckpt_path", str(ckpt)]
        cli_main([stage, "--config", str(cfg), *single, *args])
    metrics = cfg.parent / "run" / f"metrics_{stage}.json"
    return json.loads(metrics.read_text()) if stage == "test" else {}


def test_the_collective_check_refuses_what_nccl_refuses(tmp_path):
    """`collectives_nccl_accepts` fails on unequal shapes across ranks and on a tensor off the root device."""

    def write(calls1, root="cuda"):
        calls0 = [{"op": "all_reduce", "tensors": [["cuda", "torch.float32", [3]]]}]
        for r, calls in enumerate((calls0, calls1)):
            record = {"root_device": root, "calls": calls}
            (tmp_path / f"collectives-fit-rank{r}.json").write_text(json.dumps(record))

    write([{"op": "all_reduce", "tensors": [["cuda", "torch.float32", [3]]]}])
    assert collectives_nccl_accepts(tmp_path, "fit") == 1
    write([{"op": "all_reduce", "tensors": [["cuda", "torch.float32", [2]]]}])
    with pytest.raises(AssertionError):
        collectives_nccl_accepts(tmp_path, "fit")
    cpu = [{"op": "all_reduce", "tensors": [["cpu", "torch.float32", [3]]]}]
    write(cpu)
    for r in range(2):  # both ranks hand the collective a CPU tensor, the root device is CUDA
        (tmp_path / f"collectives-fit-rank{r}.json").write_text(
            json.dumps({"root_device": "cuda", "calls": cpu})
        )
    with pytest.raises(AssertionError, match="all_reduce"):
        collectives_nccl_accepts(tmp_path, "fit")
    write([{"op": "broadcast", "tensors": [["cuda", "torch.float32", [3]]]}])
    with pytest.raises(AssertionError):
        collectives_nccl_accepts(tmp_path, "fit")
