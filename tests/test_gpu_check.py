"""scripts/gpu_check.py: the parts that run without a GPU (this machine has none, so the CUDA
measurements themselves never run here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
    import yaml

    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "gpu.json")]) == 0
    printed = capsys.readouterr().out
    plan = gpu_check.commands(str(tmp_path))
    assert set(plan) == {
        "cached_fit",
        "online_fit",
        "one_gpu_validate",
        "ddp_fit",
        "ddp_validate",
        "fsdp_fit",
        "fsdp_validate",
    }
    gpu_check.write_configs(str(tmp_path))
    for name, cmd in plan.items():
        assert f"{name}: " in printed
        config, trainer = cmd[cmd.index("--config") + 1], cmd[cmd.index("--trainer") + 1]
        assert Path(config).is_file() and (REPO / trainer).is_file(), cmd
        run = yaml.safe_load(Path(config).read_text())
        # every run writes under its own directory, none into runs/quickstart
        assert "runs/quickstart" not in Path(config).read_text()
        assert run["trainer"]["default_root_dir"] == str(tmp_path / Path(config).stem)
        # an uneven share of validation rows for every GPU count
        assert all(run["data"]["max_eval_samples"] % n for n in range(2, 9))
    # DDP and FSDP validate the one-GPU checkpoint, on every GPU, with their presets
    ckpt = plan["one_gpu_validate"][plan["one_gpu_validate"].index("--ckpt_path") + 1]
    for strategy in ("ddp", "fsdp"):
        cmd = plan[f"{strategy}_validate"]
        assert cmd[cmd.index("--ckpt_path") + 1] == ckpt
        assert (
            f"configs/trainer/{strategy}.yaml" in cmd
            and f"configs/trainer/{strategy}.yaml" in plan[f"{strategy}_fit"]
        )
    assert "online" in plan["online_fit"]


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
