"""Which precision an encoder computes in on a device, and why: the `compute_dtype` setting resolved
against the weights' dtype, the architecture and what torch reports about the hardware."""

from __future__ import annotations

from typing import Literal

import torch

from layerfusion.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ComputeDtype = Literal["auto", "float32", "tfloat32", "bfloat16", "float16"]
COMPUTE_DTYPES = ("auto", "float32", "tfloat32", "bfloat16", "float16")
# model_type -> why a bf16/fp16 autocast over its fp32 weights fails (weights loaded in half precision work)
NO_AUTOCAST = {
    "deberta": "DeBERTa (v1) fills masked attention scores with float32's minimum, which overflows the "
    "half-precision scores under autocast (transformers' modeling_deberta)",
}


def resolve_compute_dtype(
    requested: str,
    device_type: str,
    weights: torch.dtype = torch.float32,
    model_type: str | None = None,
) -> tuple[str, str]:
    """The precision an encoder with `compute_dtype=requested` computes in on this device type, and why."""
    no_autocast = NO_AUTOCAST.get(model_type) if weights == torch.float32 else None
    if requested != "auto":
        if requested in ("float32", "tfloat32") and weights != torch.float32:
            raise ConfigError(f"compute_dtype {requested} needs float32 weights, got {weights}")
        if requested in ("bfloat16", "float16") and no_autocast:
            raise ConfigError(
                f"compute_dtype {requested} with float32 weights: {no_autocast}; set torch_dtype: "
                f"{requested} to load the weights in it, or compute_dtype: float32"
            )
        if requested == "tfloat32" and device_type != "cuda":
            return (
                "float32",
                f"compute_dtype tfloat32: TF32 exists on CUDA only, fp32 on {device_type}",
            )
        return requested, f"compute_dtype {requested} set in the config"
    if weights != torch.float32:
        name = str(weights).removeprefix("torch.")
        return name, f"weights loaded in {name} (torch_dtype): computing in it"
    if no_autocast:
        return "float32", f"{no_autocast}; set torch_dtype for half precision"
    if device_type == "cuda":
        card = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", f"{card} has bf16 units"
        major, minor = torch.cuda.get_device_capability()
        return "float16", f"{card} (compute capability {major}.{minor}) has no bf16 units"
    if device_type == "cpu":
        units = cpu_bf16_units()
        if units:
            return "bfloat16", f"this CPU has {units} (torch.cpu reports it)"
        return "float32", (
            "torch.cpu reports neither AVX512-BF16 nor AMX on this CPU "
            f"(kernels: {torch.backends.cpu.get_cpu_capability()}), so bf16 would be emulated"
        )
    return "float32", f"no reduced precision is chosen automatically on {device_type}"


def cpu_bf16_units() -> str | None:
    """The bf16 units of this CPU as torch reports them (`AMX`, `AVX512-BF16`), or None."""
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    found = [name for name, check in checks if getattr(torch.cpu, check, lambda: False)()]
    return " and ".join(found) or None
