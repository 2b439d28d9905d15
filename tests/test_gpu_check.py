"""scripts/gpu_check.py: the parts that run without a GPU (this machine has none, so the CUDA
measurements themselves never run here)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import MINILM, REPO

from layerfusion.encoders.frozen import cpu_bf16_units

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_says_so_and_exits_cleanly(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert _gpu_check().main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("gpu-check: no CUDA device visible") and "nothing measured" in printed
    assert not out.exists()


def test_dry_run_prints_a_plan_whose_configs_exist(tmp_path, capsys):
    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "gpu.json")]) == 0
    printed = capsys.readouterr().out
    plan = gpu_check.commands(str(tmp_path))
    assert set(plan) == {"quickstart_fit", "quickstart_test", "ddp_fit"}
    for name, cmd in plan.items():
        assert f"{name}: " in printed
        configs = [cmd[i + 1] for i, arg in enumerate(cmd) if arg in ("--config", "--trainer")]
        assert configs and all((REPO / c).is_file() for c in configs), configs
    assert "configs/trainer/ddp.yaml" in plan["ddp_fit"]


@pytest.mark.slow
def test_extraction_measurement_runs_on_cpu(shared_data):
    """The measuring code of the card check, on the CPU: real MiniLM, real SST-2 sentences."""
    gpu_check = _gpu_check()
    lines = (shared_data / "sst2" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    texts = [json.loads(line)["text"] for line in lines]
    figures = gpu_check.measure_extraction(MINILM, texts, "cpu", ("float32", "bfloat16"))
    assert set(figures) == {"float32", "bfloat16", "auto"}
    assert all(f["sentences_per_second"] > 0 for f in figures.values())
    assert figures["float32"]["max_abs_diff_to_float32"] == 0
    assert 0 < figures["bfloat16"]["max_abs_diff_to_float32"] < 0.5
    assert figures["auto"]["resolved"] == ("bfloat16" if cpu_bf16_units() else "float32")
