"""A frozen Hugging Face encoder whose every layer is tapped and pooled."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from layerfusion.encoders.taps import LayerTaps, Pooling
from layerfusion.errors import ConfigError

log = logging.getLogger(__name__)

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
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    trust_remote_code: bool = False
    """Allow the model directory to run its own Python code. Off unless you trust the source."""
    alias: str | None = None
    """Short name used in logs, features and checkpoints (default: last part of `name`)."""

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
        self.taps = LayerTaps(tap_modules(self.model), spec.pooling)
        self._fingerprint: str | None = None

    @property
    def num_layers(self) -> int:
        """Tapped layers including layer 0 (the embedding output)."""
        return len(self.taps)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """Run the encoder without gradients and return every layer pooled, `[B, L+1, d]` in fp32."""
        if not self.taps.active:  # closed by a previous stage's teardown
            self.taps = LayerTaps(tap_modules(self.model), self.spec.pooling)
        self.taps.start(attention_mask)
        extra = {"use_cache": False} if self.model.config.model_type in DECODERS else {}
        with torch.no_grad():
            self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **extra)
        return self.taps.stack()

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode (no dropout) whatever the trainer asks."""
        return super().train(False)

    def fingerprint(self) -> str:
        """SHA-256 over every weight and buffer: identifies the encoder's content for caching."""
        if self._fingerprint is None:
            h = hashlib.sha256(type(self.model).__name__.encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(str(tensor.dtype).encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def tokenizer_fingerprint(self) -> str:
        """SHA-256 of the tokenizer's definition (vocab, normalizer, special tokens; not its call state)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            definition = json.loads(backend.to_str())
            for transient in (
                "truncation",
                "padding",
            ):  # set by each call, not part of the tokenizer
                definition.pop(transient, None)
            text = json.dumps(definition, sort_keys=True)
        else:
            text = repr(sorted(self.tokenizer.get_vocab().items()))
        text += f"|pad={self.tokenizer.pad_token}|side={self.tokenizer.padding_side}"
        return hashlib.sha256(text.encode()).hexdigest()

    def close(self) -> None:
        """Remove the taps' hooks (the next forward registers them again)."""
        self.taps.remove()


def load_pretrained(spec: EncoderSpec):
    """Load model and tokenizer for `spec` from the local model directory or the hub."""
    from transformers import AutoModel

    from layerfusion.encoders.offline import resolve_model

    path = resolve_model(spec.name)
    kwargs = {"trust_remote_code": spec.trust_remote_code}
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
        path or resolve_model(spec.name), trust_remote_code=spec.trust_remote_code
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
        resolve_model(spec.name), trust_remote_code=spec.trust_remote_code
    )


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
    return [model.get_submodule(embed), *layers[:-1], last]


def freeze(model: nn.Module) -> None:
    """Put `model` in eval mode and turn off gradients for every parameter."""
    model.eval()
    model.requires_grad_(False)


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
        offset = (
            (config.pad_token_id + 1)
            if config.model_type in ("roberta", "xlm-roberta", "camembert")
            else 0
        )
        limits.append(int(positions) - offset)
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
