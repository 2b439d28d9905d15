"""FrozenEncoder + LayerTaps on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS

from layerfusion.encoders.frozen import (
    ARCHITECTURES,
    EncoderSpec,
    FrozenEncoder,
    clamp_max_length,
    cpu_bf16_units,
    load_pretrained,
    resolve_compute_dtype,
    tap_modules,
)
from layerfusion.encoders.taps import pool
from layerfusion.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "a short one .",
    "a rather longer sentence that needs more tokens than the first one does",
    "mid length text here",
]


def _encoder(path: str, pooling: str = "mean", **kw) -> FrozenEncoder:
    """fp32 unless asked: the exactness checks below hold for fp32, and `auto` is bf16 on CPUs with bf16 units."""
    return FrozenEncoder(
        EncoderSpec(name=path, pooling=pooling, **{"compute_dtype": "float32", **kw})
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_taps_equal_pooled_output_hidden_states(tiny_models, arch, pooling):
    enc = _encoder(tiny_models[arch], pooling)
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0, (
        "the batch must contain padding for this test to mean anything"
    )
    tapped = enc(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = enc.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
    assert tapped.shape == (len(TEXTS), len(ref), enc.hidden_size)
    assert enc.num_layers == len(ref) == 3  # embeddings + 2 blocks
    for i, h in enumerate(ref):
        torch.testing.assert_close(
            tapped[:, i], pool(h, batch["attention_mask"], pooling), atol=1e-5, rtol=0
        )


def test_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))
    left = torch.tensor(
        [[0, 1, 1], [1, 1, 1]]
    )  # left padding: last token is still the last real one
    torch.testing.assert_close(pool(hidden, left, "last"), torch.tensor([[4.0, 5.0], [10.0, 11.0]]))
    # left padding: the first token is a pad, so `cls` takes the first real one
    torch.testing.assert_close(pool(hidden, left, "cls"), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))


def test_encoder_is_frozen_and_stays_in_eval(tiny_models):
    enc = _encoder(tiny_models["bert"])
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training and not any(m.training for m in enc.model.modules())
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    out = enc(batch["input_ids"], batch["attention_mask"])
    assert not out.requires_grad
    assert all(p.grad is None for p in enc.parameters())


def test_hooks_removed_on_close(tiny_models):
    enc = _encoder(tiny_models["roberta"])
    modules = tap_modules(enc.model)
    assert all(len(m._forward_hooks) == 1 for m in modules)
    enc.close()
    assert all(len(m._forward_hooks) == 0 for m in modules)
    assert not enc.taps.active


def test_taps_ignore_forward_outside_a_recording(tiny_models):
    enc = _encoder(tiny_models["bert"])
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = enc.model(
            **batch, output_hidden_states=True
        )  # a plain forward: no recording, no stop
    assert len(out.hidden_states) == enc.num_layers
    with enc.taps.record(batch["attention_mask"], depth=0) as recording:
        pass
    with pytest.raises(RuntimeError, match="did not fire"):
        recording.stack()


def test_max_length_is_clamped_with_a_warning(tiny_models, caplog):
    model, tok = load_pretrained(EncoderSpec(tiny_models["bert"]))
    spec = EncoderSpec(tiny_models["bert"], max_length=100_000)
    with caplog.at_level("WARNING"):
        assert clamp_max_length(spec, tok, model.config) == 512
    assert "clamped to 512" in caplog.text
    roberta, rtok = load_pretrained(EncoderSpec(tiny_models["roberta"]))
    # RoBERTa positions start after padding_idx (here 0): 512 position embeddings hold 511 tokens
    assert clamp_max_length(EncoderSpec("r", max_length=10_000), rtok, roberta.config) == 511
    with pytest.raises(ConfigError, match="max_length"):
        clamp_max_length(EncoderSpec("x", max_length=0), tok, model.config)


def test_unsupported_architecture_is_named():
    from transformers import AutoModel, T5Config

    model = AutoModel.from_config(
        T5Config(vocab_size=50, d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8)
    )
    with pytest.raises(ConfigError, match="unsupported encoder architecture 't5'.*supported: bert"):
        tap_modules(model)


def test_fingerprint_tracks_weights(tiny_models):
    a, b = _encoder(tiny_models["bert"]), _encoder(tiny_models["bert"])
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.model.embeddings.word_embeddings.weight[0, 0] += 1.0
    b._fingerprint = None
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() != _encoder(tiny_models["roberta"]).fingerprint()


def test_mpnet_clamp_leaves_room_for_its_position_offset(tiny_models):
    """MPNet numbers positions from padding_idx + 1 = 2 (fixed in its code): the clamped length runs, one
    more token fails."""
    mpnet, tok = load_pretrained(EncoderSpec(tiny_models["mpnet"]))
    limit = clamp_max_length(EncoderSpec("m", max_length=10_000), tok, mpnet.config)
    assert limit == mpnet.config.max_position_embeddings - 2 == 510
    with torch.no_grad():
        mpnet(input_ids=torch.full((1, limit), 5))
        with pytest.raises(IndexError):
            mpnet(input_ids=torch.full((1, limit + 1), 5))


def _block_calls(enc: FrozenEncoder) -> tuple[list[int], list]:
    """A call counter per transformer block of `enc` (and the hook handles to remove)."""
    blocks = enc.model.get_submodule(ARCHITECTURES[enc.model.config.model_type][1])
    calls = [0] * len(blocks)

    def counter(i):
        def hook(*_):
            calls[i] += 1

        return hook

    return calls, [b.register_forward_hook(counter(i)) for i, b in enumerate(blocks)]


@pytest.mark.parametrize("arch", ARCHS)
def test_early_exit_runs_no_block_above_depth_and_keeps_layers_exact(tiny_models, arch):
    enc = _encoder(tiny_models[arch])
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = enc(ids, mask)
    blocks = enc.model.get_submodule(ARCHITECTURES[enc.model.config.model_type][1])
    calls, handles = _block_calls(enc)
    for depth in range(enc.num_layers):
        calls[:] = [0] * len(calls)
        part = enc(ids, mask, depth=depth)
        assert part.shape == (len(TEXTS), depth + 1, enc.hidden_size)
        assert torch.equal(part, full[:, : depth + 1]), f"layers 0..{depth} differ from a full pass"
        assert calls == [1] * depth + [0] * (len(blocks) - depth), calls
    for h in handles:
        h.remove()
    assert enc.model.get_submodule(ARCHITECTURES[enc.model.config.model_type][1]) is blocks
    with pytest.raises(ValueError, match="depth must be in 0..2"):
        enc(ids, mask, depth=3)


def test_early_exit_restores_the_blocks_when_the_forward_fails(tiny_models):
    enc = _encoder(tiny_models["llama"])
    blocks = enc.model.layers
    with pytest.raises(IndexError):
        enc(torch.full((1, 4), 10**7), torch.ones(1, 4, dtype=torch.long), depth=1)
    assert enc.model.layers is blocks and len(enc.model.layers) == 2


def test_sdpa_attention_wherever_transformers_offers_it(tiny_models):
    """Every architecture whose transformers class supports SDPA loads with it; the others are eager."""
    for arch in ARCHS:
        model, _ = load_pretrained(EncoderSpec(tiny_models[arch]))
        expected = "sdpa" if type(model)._supports_sdpa else "eager"
        assert model.config._attn_implementation == expected, arch
    assert not type(load_pretrained(EncoderSpec(tiny_models["mpnet"]))[0])._supports_sdpa


def test_auto_compute_dtype_follows_what_torch_reports(monkeypatch):
    name, reason = resolve_compute_dtype("auto", "cpu")
    assert name == ("bfloat16" if cpu_bf16_units() else "float32"), reason
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(
        torch.cpu, "_is_avx512_bf16_supported", lambda: True
    )  # a CPU with bf16 units
    assert resolve_compute_dtype("auto", "cpu") == (
        "bfloat16",
        "this CPU has AVX512-BF16 (torch.cpu reports it)",
    )
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    name, reason = resolve_compute_dtype("auto", "cpu")
    assert name == "float32" and "neither AVX512-BF16 nor AMX" in reason
    assert resolve_compute_dtype("bfloat16", "cpu")[0] == "bfloat16"
    assert resolve_compute_dtype("tfloat32", "cpu")[0] == "float32"  # TF32 is CUDA-only
    assert resolve_compute_dtype("auto", "cpu", torch.bfloat16)[0] == "bfloat16"  # bf16 weights
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    name, reason = resolve_compute_dtype("auto", "cpu", model_type="deberta")
    assert name == "float32" and "DeBERTa (v1)" in reason  # autocast would overflow its mask fill


def test_deberta_v1_computes_in_half_precision_only_with_half_precision_weights(tiny_models):
    """transformers' DeBERTa (v1) masks scores with float32's minimum: under a bf16 autocast over fp32
    weights that raises; `auto` stays fp32 for it, an explicit bf16 says what to set, bf16 weights run."""
    path = tiny_models["deberta"]
    fp32 = _encoder(path)
    batch = fp32.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref = fp32(ids, mask)
    with pytest.raises(ConfigError, match="DeBERTa .v1.*set torch_dtype: bfloat16"):
        _encoder(path, compute_dtype="bfloat16").compute_precision("cpu")
    half = _encoder(path, compute_dtype="auto", torch_dtype="bfloat16")
    assert half.compute_precision("cpu") == "bfloat16"
    out = half(ids, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min() > 0.99, cos.min()


def test_compute_dtype_is_checked():
    with pytest.raises(ConfigError, match="compute_dtype must be one of auto, float32"):
        EncoderSpec("x", compute_dtype="fp8")
    with pytest.raises(ConfigError, match="needs float32 weights"):
        EncoderSpec("x", compute_dtype="float32", torch_dtype="bfloat16")


def test_bf16_compute_runs_the_blocks_in_bf16_and_pools_in_fp32(tiny_models, caplog):
    path = tiny_models["bert"]
    fp32 = _encoder(path, compute_dtype="float32")
    bf16 = _encoder(path, compute_dtype="bfloat16")
    batch = fp32.tokenizer(TEXTS, padding=True, return_tensors="pt")
    seen = []
    for enc in (fp32, bf16):
        query = enc.model.encoder.layer[1].attention.self.query
        handle = query.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        with caplog.at_level("INFO", logger="layerfusion.encoders.frozen"):
            a = enc(batch["input_ids"], batch["attention_mask"])
            enc(batch["input_ids"], batch["attention_mask"])
        handle.remove()
        assert a.dtype == torch.float32  # pooled in fp32 whatever the compute precision
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2
    chosen = [r.getMessage() for r in caplog.records if "computes in" in r.getMessage()]
    assert chosen == [
        f"encoder {path.split('/')[-1]} computes in float32 on cpu: compute_dtype float32 set in the config",
        f"encoder {path.split('/')[-1]} computes in bfloat16 on cpu: compute_dtype bfloat16 set in the config",
    ]  # once per encoder, not per forward


def test_fp32_compute_is_shielded_from_an_outer_autocast(tiny_models):
    """A bf16-mixed trainer autocasts the step; an encoder set to float32 still computes in fp32."""
    enc = _encoder(tiny_models["bert"], compute_dtype="float32")
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ref = enc(batch["input_ids"], batch["attention_mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = enc(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(inside, ref)


def test_mpnet_attention_runs_through_sdpa_with_eager_results(tiny_models):
    """MPNet (eager-only in transformers 5) gets layerfusion's SDPA path: same features as its eager
    code, attention weights still available, and the encoder still pickles (ddp_spawn)."""
    import pickle

    from layerfusion.encoders.frozen import set_mpnet_sdpa

    enc = _encoder(tiny_models["mpnet"])
    attention = enc.model.encoder.layer[0].attention.attn
    assert "forward" in attention.__dict__  # the SDPA path is installed
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bias = enc.model.encoder.relative_attention_bias.weight
    with torch.no_grad():  # a position bias that matters (the tiny model's is ~0.02, nearly none)
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)) * 2.0)
        kept = bias.clone()
        bias.zero_()
        unbiased = enc(ids, mask)
        bias.copy_(kept)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:  # count the calls of the real function
        mp.setattr(
            torch.nn.functional,
            "scaled_dot_product_attention",
            lambda *a, **k: calls.append(1) or sdpa(*a, **k),
        )
        fast = enc(ids, mask)
    assert len(calls) == 2  # one per block
    set_mpnet_sdpa(enc.model, False)
    assert "forward" not in attention.__dict__
    eager = enc(ids, mask)
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)
    assert (unbiased - eager).abs().max() > 1e-3  # dropping the bias: > 60x the tolerance
    set_mpnet_sdpa(enc.model, True)
    with torch.no_grad():
        out = enc.model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape[-1] == ids.shape[1]
    clone = pickle.loads(pickle.dumps(enc))
    torch.testing.assert_close(clone(ids, mask), fast)


def test_early_exit_under_fsdp_stops_outside_every_unit(tiny_models, tmp_path):
    """Taps registered before FSDP wraps each block: the same layers, and the early exit ends the pass
    between units, never inside one (a unit left mid-forward keeps its parameters gathered). One process
    (FSDP runs NO_SHARD there); the unit states are what FSDP itself tracks."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from layerfusion.encoders.frozen import blocks_of

    enc = _encoder(tiny_models["bert"])
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    depths = (1, 2, 0, 1)
    expected = [enc(batch["input_ids"], batch["attention_mask"], depth=d) for d in depths]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        with pytest.warns(UserWarning, match="switching to use `NO_SHARD`"):
            wrapped = FSDP(
                enc,
                auto_wrap_policy=ModuleWrapPolicy({type(blocks_of(enc.model)[0])}),
                device_id=torch.device("cpu"),
                use_orig_params=True,
            )
        for depth, want in zip(depths, expected):
            got = wrapped(batch["input_ids"], batch["attention_mask"], depth=depth)
            assert torch.equal(got, want), depth
            states = [m.training_state.name for m in wrapped.modules() if isinstance(m, FSDP)]
            assert states == ["IDLE"] * 3, f"depth {depth}: FSDP units {states}"
    finally:
        dist.destroy_process_group()


def test_taps_run_in_a_compiled_model_registered_before_compiling(tiny_models):
    """`torch.compile` after the taps are registered (the documented order): the same layers, early exit
    included (the hooks run eagerly: a context variable cannot be traced)."""
    from layerfusion.encoders.frozen import blocks_of

    enc = _encoder(tiny_models["bert"])
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    expected = [enc(batch["input_ids"], batch["attention_mask"], depth=d) for d in (2, 1)]
    for block in blocks_of(enc.model):  # each block compiled in place, its hooks with it
        block.compile(backend="eager")
    try:
        for depth, want in zip((2, 1), expected):
            got = enc(batch["input_ids"], batch["attention_mask"], depth=depth)
            assert torch.equal(got, want), depth
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_one_tokenize_and_batched_forward_equal_the_paths_they_replace(tiny_models, arch):
    """`encoders.forward`: `tokenize` gives what the tokenizer's own padded call gives, and
    `forward_batches` what the cache's extraction gives, bit for bit (same batches, same layers)."""
    from layerfusion.encoders import forward
    from layerfusion.features import extraction

    enc = _encoder(tiny_models[arch], "last" if arch == "gpt2" else "mean", max_length=12)
    texts = [*TEXTS, "", "x " * 40]
    ours = enc.tokenize(texts)
    theirs = enc.tokenizer(texts, truncation=True, max_length=12, padding=True, return_tensors="pt")
    assert ours.keys() == {"input_ids", "attention_mask"}
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    args = (enc, texts, [0, 2], "cpu", 40, 3)
    new, old = list(forward.forward_batches(*args)), list(extraction.forward_batches(*args))
    assert [rows for rows, _ in new] == [rows for rows, _ in old] and len(new) > 1
    for (_, a), (_, b) in zip(new, old):
        assert torch.equal(a, b)
