"""A frozen Hugging Face encoder whose every layer is tapped and pooled."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from layerfusion.encoders.precision import (  # noqa: F401 (public here too)
    COMPUTE_DTYPES,
    DTYPES,
    NO_AUTOCAST,
    ComputeDtype,
    cpu_bf16_units,
    resolve_compute_dtype,
)
from layerfusion.encoders.taps import LayerTaps, Pooling
from layerfusion.errors import ConfigError

log = logging.getLogger(__name__)
_REOPENING = threading.Lock()  # module level: a lock attribute would not pickle for ddp_spawn

# model_type -> (embedding-output module, list of blocks, final norm applied to the last block or None).
# Each entry matches what the model returns as `output_hidden_states` (checked in tests).
ARCHITECTURES: dict[str, tuple[str, str, str | None]] = {
    **dict.fromkeys(
        [
            "bert",
            "roberta",
            "xlm-roberta",
            "camembert",
            "mpnet",
            "deberta",
            "deberta-v2",
            "electra",
        ],
        ("embeddings", "encoder.layer", None),
    ),
    "distilbert": ("embeddings", "transformer.layer", None),
    "gpt2": ("drop", "h", "ln_f"),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3"], ("embed_tokens", "layers", "norm")),
}
DECODERS = {"gpt2", "llama", "mistral", "qwen2", "qwen3"}


@dataclass
class EncoderSpec:
    """One frozen encoder of the fusion model."""

    name: str
    """Hub id or local directory; hub ids resolve to $LAYERFUSION_MODELS/<id> first."""
    pooling: Pooling = "mean"
    """How each layer's token states become one vector: masked `mean`, `cls` token, or `last` non-pad token."""
    max_length: int = 128
    """Tokens per text; clamped (with a warning) to the model's limit."""
    torch_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Load the encoder weights in this dtype (None = as saved, fp32 for these models)."""
    compute_dtype: ComputeDtype = "auto"
    """Precision the encoder computes in (weights stay as loaded): `auto` = bf16 autocast on CUDA
    devices and CPUs that have bf16 units, fp16 autocast on older CUDA, fp32 otherwise; `float32`
    (IEEE fp32 everywhere), `tfloat32` (fp32 with TF32 matmuls on CUDA), `bfloat16`, `float16`.
    Pooling is fp32 whatever this says."""
    trust_remote_code: bool = False
    """Allow the model directory to run its own Python code. Off unless you trust the source."""
    alias: str | None = None
    """Short name used in logs, features and checkpoints (default: last part of `name`)."""
    revision: str | None = None
    """Hub revision to load (branch, tag or, to pin the exact files, a commit hash); recorded with the head.
    With a revision the name is always the hub id: local copies (which carry none) are skipped."""

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"encoder {self.name!r}: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                f"got {self.compute_dtype!r}"
            )
        if self.compute_dtype in ("float32", "tfloat32") and self.torch_dtype in (
            "float16",
            "bfloat16",
        ):
            raise ConfigError(
                f"encoder {self.name!r}: compute_dtype {self.compute_dtype} needs float32 weights, "
                f"but torch_dtype loads them in {self.torch_dtype}"
            )

    @property
    def key(self) -> str:
        return self.alias or self.name.rstrip("/").split("/")[-1]


class FrozenEncoder(nn.Module):
    """An `AutoModel` in eval mode with no trainable parameter; `forward` returns pooled layers `[B, L+1, d]`."""

    def __init__(self, spec: EncoderSpec, model: nn.Module | None = None, tokenizer=None) -> None:
        super().__init__()
        self.spec = spec
        if model is None or tokenizer is None:
            model, tokenizer = load_pretrained(spec)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = clamp_max_length(spec, tokenizer, model.config)
        freeze(self.model)
        set_mpnet_sdpa(self.model)
        self.taps = LayerTaps(tap_modules(self.model), spec.pooling)
        self.taps.stop_before(blocks_of(self.model))
        self._fingerprint: str | None = None
        self._tokenizer_texts: dict[str, str] = {}  # serialised tokenizer -> canonical definition
        self._precision: dict[str, tuple[str, str]] = {}

    @property
    def num_layers(self) -> int:
        """Tapped layers including layer 0 (the embedding output)."""
        return len(self.taps)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` of `texts` for this encoder (its `max_length`, padded to the
        longest); thread-safe (`layerfusion.encoders.forward.tokenize`)."""
        from layerfusion.encoders.forward import tokenize

        return tokenize(self.tokenizer, texts, self.max_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        depth: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Pooled layers `0..depth` (default: all) in fp32, `[B, depth+1, d]`, without gradients.

        Blocks above `depth` are not run at all (early exit): the pass stops before the first block no
        recorded layer needs. Safe to call from several threads at once: all per-call state lives in
        this call's `Recording`, and the model is not changed.
        """
        depth = self.num_layers - 1 if depth is None else int(depth)
        if not 0 <= depth < self.num_layers:
            raise ValueError(f"depth must be in 0..{self.num_layers - 1}, got {depth}")
        taps = self.taps
        if not taps.active:  # closed by a previous stage's teardown
            with _REOPENING:
                if not self.taps.active:
                    self.taps = LayerTaps(tap_modules(self.model), self.spec.pooling)
                taps = self.taps
        taps.stop_before(
            blocks_of(self.model)
        )  # a no-op unless a wrapper (FSDP) replaced the blocks
        extra = {"use_cache": False} if self.model.config.model_type in DECODERS else {}
        with (
            torch.no_grad(),
            self.compute_context(input_ids.device),
            taps.record(attention_mask, depth) as recording,
        ):
            self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **extra)
        return recording.stack()

    def compute_precision(self, device: torch.device | str) -> str:
        """The precision this encoder computes in on `device` (`float32`, `tfloat32`, `bfloat16`, `float16`).

        Decided once per device type from what torch reports about the hardware, and logged with the reason.
        """
        kind = torch.device(device).type
        if kind not in self._precision:
            weights = next(self.model.parameters()).dtype
            self._precision[kind] = resolve_compute_dtype(
                self.spec.compute_dtype, kind, weights, self.model.config.model_type
            )
            precision, reason = self._precision[kind]
            log.info("encoder %s computes in %s on %s: %s", self.spec.key, precision, kind, reason)
        return self._precision[kind][0]

    def compute_reason(self, device: torch.device | str) -> str:
        """Why the encoder computes in `compute_precision(device)` (what torch reported, or the config)."""
        self.compute_precision(device)
        return self._precision[torch.device(device).type][1]

    def compute_context(self, device: torch.device | str):
        """A context that runs the encoder's forward in its compute precision on `device`."""
        kind = torch.device(device).type
        precision = self.compute_precision(device)
        if precision in ("bfloat16", "float16"):
            return torch.autocast(kind, dtype=DTYPES[precision])
        # fp32 (or the weights' own dtype): switch off any autocast around us, e.g. a bf16-mixed trainer
        if kind == "cuda":
            return _cuda_fp32("high" if precision == "tfloat32" else "highest")
        return torch.autocast(kind, enabled=False) if kind == "cpu" else nullcontext()

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode (no dropout) whatever the trainer asks."""
        return super().train(False)

    def fingerprint(self) -> str:
        """SHA-256 of what the encoder computes: its class, every weight and buffer (persistent or not, e.g.
        rotary `inv_freq`) and its config (e.g. `rope_theta`, `layer_norm_eps`; not where it was loaded from)."""
        if self._fingerprint is None:
            h = hashlib.sha256(type(self.model).__name__.encode())
            tensors = dict(self.model.state_dict())
            tensors.update(
                self.model.named_buffers()
            )  # non-persistent buffers are not in the state dict
            for name, tensor in sorted(tensors.items()):
                h.update(name.encode())
                h.update(str(tensor.dtype).encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            h.update(config_text(self.model.config).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def tokenizer_fingerprint(self) -> str:
        """SHA-256 of the tokenizer's definition (vocab, normalizer, special tokens) and of the sides it pads
        and truncates on; not its per-call state."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # to_str takes ~10 ms; parsing it to drop the per-call settings ~70 ms more: done once per
            # state (each call's truncation and padding settings are in the serialised form)
            serialised = backend.to_str()
            text = self._tokenizer_texts.get(serialised)
            if text is None:
                definition = json.loads(serialised)
                for transient in ("truncation", "padding"):  # set by each call, not the tokenizer's
                    definition.pop(transient, None)
                text = json.dumps(definition, sort_keys=True)
                if len(self._tokenizer_texts) >= 4:
                    self._tokenizer_texts.clear()
                self._tokenizer_texts[serialised] = text
        else:
            text = repr(sorted(self.tokenizer.get_vocab().items()))
        text += (
            f"|pad={self.tokenizer.pad_token}|side={self.tokenizer.padding_side}"
            f"|truncation_side={self.tokenizer.truncation_side}"
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """What a head trained on this encoder records about it (checkpoints, classifier folders): name,
        revision, SHA-256 of the weights and of the tokenizer, depth and the effective max_length."""
        return {
            "name": self.spec.name,
            "revision": self.spec.revision,
            "weights_sha256": self.fingerprint(),
            "layers": self.num_layers,
            "tokenizer_sha256": self.tokenizer_fingerprint(),
            "max_length": self.max_length,
        }

    def identity_differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """How this encoder differs from `recorded` (an `identity()` stored with a head) in what it computes:
        weights, depth, tokenizer, max_length. Fields a record lacks (older layerfusion) are not compared."""
        ours = self.identity()
        out = []
        for field, what in IDENTITY_CHECKED.items():
            if field in recorded and recorded[field] != ours[field]:
                now, then = ours[field], recorded[field]
                if field.endswith("_sha256"):
                    now, then = f"{str(now)[:12]}...", f"{str(then)[:12]}..."
                out.append(f"{what} {now}, trained with {then}")
        return out

    def check_identity(self, recorded: Mapping[str, Any], artifact: str = "this head") -> None:
        """Refuse to serve a head trained on another encoder, naming the encoder and what differs."""
        differences = self.identity_differences(recorded)
        if differences:
            raise ConfigError(
                f"encoder {self.spec.key!r} ({self.spec.name}) is not the one {artifact} was trained on: "
                + "; ".join(differences)
            )

    def close(self) -> None:
        """Remove the taps' hooks (the next forward registers them again)."""
        self.taps.remove()


IDENTITY_CHECKED = {
    "weights_sha256": "weights SHA-256",
    "layers": "layers",
    "tokenizer_sha256": "tokenizer SHA-256",
    "max_length": "max_length",
}
"""The fields of `FrozenEncoder.identity()` a head's encoder must match, and how messages name them."""


def encoders_mismatch(
    recorded: Mapping[str, Mapping[str, Any]], encoders: Mapping[str, FrozenEncoder]
) -> str | None:
    """Why `encoders` are not the ones a head recorded (`{key: identity()}`), or None when they are."""
    if set(recorded) != set(encoders):
        return f"encoders {sorted(recorded)} were recorded, these are {sorted(encoders)}"
    problems = [
        f"{key}: {'; '.join(diff)}"
        for key, encoder in encoders.items()
        if (diff := encoder.identity_differences(recorded[key]))
    ]
    return " | ".join(problems) or None


CONFIG_TRANSIENT = (
    "_name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
)
"""Config fields that say where or by what a model was saved, not what it computes (the weights' dtype is
hashed with the weights)."""


def config_text(config) -> str:
    """The model config as canonical JSON, without the fields in `CONFIG_TRANSIENT`."""
    fields = json.loads(config.to_json_string())
    for name in CONFIG_TRANSIENT:
        fields.pop(name, None)
    return json.dumps(fields, sort_keys=True)


def load_pretrained(spec: EncoderSpec):
    """Load model and tokenizer for `spec` from the local model directory or the hub."""
    from transformers import AutoModel

    from layerfusion.encoders.offline import resolve_model

    path = resolve_model(spec.name, spec.revision)
    kwargs = {"trust_remote_code": spec.trust_remote_code, **_revision(spec)}
    if spec.torch_dtype:
        kwargs["dtype"] = DTYPES[spec.torch_dtype]
    model = AutoModel.from_pretrained(path, **kwargs)
    tokenizer = load_tokenizer(spec, path)
    return model, tokenizer


def load_tokenizer(spec: EncoderSpec, path: str | None = None):
    """The tokenizer of `spec`, with a pad token (decoders pad with their EOS token)."""
    from transformers import AutoTokenizer

    from layerfusion.encoders.offline import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(
        path or resolve_model(spec.name, spec.revision),
        trust_remote_code=spec.trust_remote_code,
        **_revision(spec),
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"tokenizer of {spec.name!r} has neither a pad nor an EOS token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(spec: EncoderSpec):
    """The model config of `spec` (no weights loaded)."""
    from transformers import AutoConfig

    from layerfusion.encoders.offline import resolve_model

    return AutoConfig.from_pretrained(
        resolve_model(spec.name, spec.revision),
        trust_remote_code=spec.trust_remote_code,
        **_revision(spec),
    )


def _revision(spec: EncoderSpec) -> dict[str, str]:
    """`from_pretrained`'s `revision` argument for `spec` (none when it pins no revision)."""
    return {"revision": spec.revision} if spec.revision else {}


def tap_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the model's hidden states 0..L, per architecture."""
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"unsupported encoder architecture {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    embed, blocks, final_norm = ARCHITECTURES[model_type]
    layers = list(model.get_submodule(blocks))
    last = model.get_submodule(final_norm) if final_norm else layers[-1]
    modules = [model.get_submodule(embed), *layers[:-1], last]
    if model_type == "electra" and hasattr(model, "embeddings_project"):
        modules[0] = (
            model.embeddings_project
        )  # embeddings narrower than the blocks: projected first
    if model_type == "deberta-v2" and getattr(model.encoder, "conv", None) is not None:
        modules[1] = model.encoder.conv  # conv_kernel_size > 0: a convolution follows block 0
    return modules


def set_mpnet_sdpa(model: nn.Module, enabled: bool = True) -> None:
    """MPNet's self-attention through `scaled_dot_product_attention` (enabled) or its own eager code.

    transformers 5 has eager attention only for MPNet (a relative position bias added to the scores);
    SDPA with that bias plus the padding mask as a float mask computes the same (within 1e-6) and was
    faster in `benchmarks/mpnet_sdpa.py`. Calls asking for attention weights still take the eager path.
    Other architectures are left as they are (transformers picks SDPA for them where it has it).
    """
    if model.config.model_type != "mpnet":
        return
    from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

    for module in model.modules():
        if isinstance(module, MPNetSelfAttention):
            if enabled:
                module.forward = functools.partial(_mpnet_sdpa_forward, module)
            else:
                module.__dict__.pop("forward", None)


def _mpnet_sdpa_forward(
    self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs
):
    """`MPNetSelfAttention.forward` with scores, softmax and the value product done by SDPA."""
    if output_attentions:  # SDPA returns no weights: the eager code does
        eager = type(self).forward
        return eager(
            self, hidden_states, attention_mask, position_bias, output_attentions, **kwargs
        )
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.attention_head_size)
    q = self.q(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v(hidden_states).view(hidden_shape).transpose(1, 2)
    mask = position_bias
    if attention_mask is not None:
        mask = attention_mask if mask is None else mask + attention_mask
    if mask is not None:
        mask = mask.to(q.dtype)
    context = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return (self.o(context.transpose(1, 2).reshape(*input_shape, self.all_head_size)),)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (as it is now: FSDP replaces its elements by wrappers)."""
    return model.get_submodule(ARCHITECTURES[model.config.model_type][1])


@contextmanager
def _cuda_fp32(matmul_precision: str) -> Iterator[None]:
    """fp32 on CUDA with this matmul precision (`high` = TF32, `highest` = IEEE), no autocast; restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def freeze(model: nn.Module) -> None:
    """Put `model` in eval mode and turn off gradients for every parameter."""
    model.eval()
    model.requires_grad_(False)


def position_offset(config) -> int:
    """Position ids unusable for tokens: RoBERTa-likes start after the config's pad id, MPNet after its fixed 1."""
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        return config.pad_token_id + 1
    return 2 if config.model_type == "mpnet" else 0


def clamp_max_length(spec: EncoderSpec, tokenizer, config) -> int:
    """`spec.max_length`, clamped to what the model can take (logged when clamped)."""
    if spec.max_length < 1:
        raise ConfigError(
            f"max_length of encoder {spec.name!r} must be >= 1, got {spec.max_length}"
        )
    limits = []
    if 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if positions and getattr(config, "position_biased_input", True):
        limits.append(int(positions) - position_offset(config))
    limit = min(limits) if limits else spec.max_length
    if spec.max_length > limit:
        log.warning(
            "encoder %s: max_length %d is beyond the model's limit; clamped to %d",
            spec.name,
            spec.max_length,
            limit,
        )
        return limit
    return spec.max_length
