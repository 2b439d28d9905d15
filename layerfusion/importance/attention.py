"""Attention entropy per layer: how spread out each head's attention over the valid tokens is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from layerfusion.encoders.frozen import DECODERS, FrozenEncoder


def attention_entropy(attn: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) of attention `[B, H, T, T]` over the valid keys of `mask [B, T]`, averaged over heads.

    Returns the sum over valid query tokens of the head-mean entropy and the number of valid query tokens,
    so that batches and ranks can be added before dividing. Each row is renormalised over the valid keys
    (pad keys carry ~0 probability already); 0 log 0 = 0.
    """
    valid = mask.to(torch.bool)
    p = attn.float() * valid[:, None, None, :]
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    per_query = -torch.special.xlogy(p, p).sum(-1).mean(1)  # [B, T]: mean over heads
    return (per_query * valid).sum(), valid.sum()


def encoder_attention_entropy(
    encoder: FrozenEncoder,
    texts: list[str],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer `[L+1]`: summed attention entropy of `texts` (layer 0, the embeddings, stays 0), and the token count.

    Runs the encoder with eager attention (SDPA returns no weights) for these texts only and restores its
    attention implementation afterwards. The layer taps are not armed, so they record nothing.
    """
    sums = torch.zeros(encoder.num_layers, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    model = encoder.model
    extra = {"use_cache": False} if model.config.model_type in DECODERS else {}
    encoder.to(device)
    _register_output_capture(model)
    with eager_attention(model), torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = encoder.tokenize(texts[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = batch["attention_mask"]
            out = model(
                input_ids=batch["input_ids"], attention_mask=mask, output_attentions=True, **extra
            )
            attentions = out.attentions or ()
            if len(attentions) != encoder.num_layers - 1:
                raise RuntimeError(
                    f"encoder {encoder.spec.key!r} returned {len(attentions)} attention maps for "
                    f"{encoder.num_layers - 1} blocks even with eager attention; set "
                    "LayerImportance(attention_samples=0) to skip attention entropy for it"
                )
            for layer, attn in enumerate(attentions, start=1):
                total, tokens = attention_entropy(attn, mask)
                sums[layer] += total.double()
            count += tokens
    return sums, count


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch a transformers model to eager attention (which returns weights) and restore the previous one."""
    previous = getattr(model.config, "_attn_implementation", None)
    can_switch = getattr(type(model), "_can_set_attn_implementation", lambda: False)()
    switch = previous not in (None, "eager") and can_switch
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


def _register_output_capture(model) -> None:
    """Make sure transformers knows what `model` can record (its attentions).

    transformers 5 registers a class's recordable outputs when a model is constructed; a model unpickled in
    a `ddp_spawn` worker was never constructed there, and `output_attentions=True` then silently returns no
    attention maps. Registering again is what construction does (a no-op where already registered).
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry returns attentions directly
        return
    for module in model.modules():
        recordable = getattr(module, "_can_record_outputs", None)
        if recordable and str(module.__class__) not in _CAN_RECORD_REGISTRY:
            _CAN_RECORD_REGISTRY[module] = recordable
