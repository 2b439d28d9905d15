"""Layer importance and layer selection: the scoring functions on synthetic data with known answers,
the callbacks in a real Trainer on tiny encoders (table, selection, checkpoint, no test-split leakage,
order of callbacks), and a 2-process `ddp_spawn` run that must pick the same layers on both ranks."""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
from ddp_probe import RecordCollectives, collectives_nccl_accepts
from layerfusion.callbacks import LayerImportance, LayerSelection
from layerfusion.callbacks.layer_importance import stratified_rows
from lightning.pytorch.callbacks import ModelCheckpoint

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import ConfigError
from layerfusion.importance import (
    LayerScore,
    attention_entropy,
    combine,
    eager_attention,
    fit_scoring_head,
    grad_norm_sums,
    minmax,
    probe_accuracy,
    read_table,
    scores_by_encoder,
    select_cumulative,
    select_fixed,
    select_top_k,
    standardise,
    write_table,
)
from layerfusion.module import LayerFusionModule

# -- synthetic features: one layer carries the label --------------------------------------------


def _one_informative_layer(n: int, layers: int, dim: int, signal: int, seed: int):
    """Features `[n, layers, dim]` of pure noise except layer `signal`, whose first dims encode the label.

    The informative layer is given a tiny raw scale and the noise layers a large one: the scores must
    not depend on the scale (features are standardised)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, layers, dim, generator=g) * 50.0
    centres = torch.randn(3, dim, generator=g) * 2.0
    x[:, signal] = (centres[y] + torch.randn(n, dim, generator=g)) * 0.01
    return x, y


def test_probe_accuracy_ranks_the_informative_layer_first():
    x, y = _one_informative_layer(900, layers=5, dim=12, signal=3, seed=0)
    train_x, train_y, dev_x, dev_y = x[:600], y[:600], x[600:], y[600:]
    acc = [probe_accuracy(train_x[:, i], train_y, dev_x[:, i], dev_y, 3) for i in range(5)]
    assert max(range(5), key=acc.__getitem__) == 3
    assert acc[3] > 0.9 and max(acc[:3] + acc[4:]) < 0.5  # chance is 1/3


def test_standardise_is_out_of_place_and_uses_train_statistics():
    """The scoring z-scores the cache's own tensors (a float32 cache on the CPU): it must not edit them."""
    g = torch.Generator().manual_seed(0)
    train, dev = torch.randn(50, 3, 4, generator=g) * 7 + 2, torch.randn(20, 3, 4, generator=g)
    before = (train.clone(), dev.clone())
    z_train, z_dev = standardise(train, dev)
    assert torch.equal(train, before[0]) and torch.equal(dev, before[1])
    assert torch.allclose(z_train.mean(0), torch.zeros(3, 4), atol=1e-5)
    assert torch.allclose(z_train.std(0), torch.ones(3, 4), atol=1e-5)
    expected = (dev - train.mean(0, keepdim=True)) / train.std(0, keepdim=True)
    assert torch.allclose(z_dev, expected)


def test_gradient_magnitude_ranks_the_informative_layer_first():
    xa, y = _one_informative_layer(600, layers=5, dim=12, signal=3, seed=1)
    g = torch.Generator().manual_seed(2)
    xb = torch.randn(600, 4, 6, generator=g)  # a second encoder that is all noise
    xb[:, 1, :3] += torch.nn.functional.one_hot(y, 3).float() * 3  # ...except its layer 1
    (xa,) = standardise(xa)
    (xb,) = standardise(xb)
    feats = {"a": xa, "b": xb}
    head = fit_scoring_head(feats, y, num_classes=3)
    sums = grad_norm_sums(head, feats, y, torch.arange(600), batch_size=128)
    assert sums["a"].argmax().item() == 3
    assert sums["b"].argmax().item() == 1
    # the per-example gradient under a summed loss equals the gradient of that example alone
    one = grad_norm_sums(head, feats, y, torch.tensor([7]))
    leaf = xa[7:8].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(head({"a": leaf, "b": xb[7:8]}), y[7:8])
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(one["a"].float(), grad[0].norm(dim=-1))


# -- attention entropy ----------------------------------------------------------------------------


def _mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths])


def test_entropy_of_uniform_attention_is_log_of_the_valid_tokens():
    mask = _mask([5, 3], 5)
    attn = (mask[:, None, None, :].float() / mask.sum(-1)[:, None, None, None]).expand(2, 4, 5, 5)
    total, tokens = attention_entropy(attn, mask)
    assert tokens.item() == 8  # valid query tokens only
    assert total.item() / tokens.item() == pytest.approx(
        (5 * math.log(5) + 3 * math.log(3)) / 8, abs=1e-6
    )


def test_entropy_of_one_hot_attention_is_zero_and_pads_do_not_count():
    mask = _mask([4, 2], 6)
    attn = torch.zeros(2, 3, 6, 6)
    attn[..., 0] = 1.0  # every query attends to the first token only
    attn[1, :, :, 1] = 0.3  # probability on a valid key is renormalised...
    attn[1, :, :, 4] = 5.0  # ...and probability on a pad key is dropped
    total, tokens = attention_entropy(attn[:1], mask[:1])
    assert total.item() == pytest.approx(0.0, abs=1e-7) and tokens.item() == 4
    total, tokens = attention_entropy(attn[1:], mask[1:])
    p = torch.tensor([1.0, 0.3]) / 1.3
    assert total.item() / tokens.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)


def test_eager_attention_is_switched_for_the_sample_and_restored(tiny_models):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models["bert"], attn_implementation="sdpa")
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
        out = model(input_ids=torch.tensor([[101, 2023, 102]]), output_attentions=True)
        assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 3, 3)
    assert model.config._attn_implementation == "sdpa"


# -- combined score and selection strategies ------------------------------------------------------


def _rows(encoder: str, grad, ent, acc) -> list[LayerScore]:
    return [LayerScore(encoder, i, g, e, a) for i, (g, e, a) in enumerate(zip(grad, ent, acc))]


def test_combined_score_is_the_documented_formula():
    nan = math.nan
    rows = _rows("a", [1.0, 3.0, 2.0], [nan, 2.0, 1.0], [0.5, 0.7, 0.9]) + _rows(
        "b", [10.0, 10.0], [nan, 4.0], [0.6, 0.8]
    )
    combine(rows, {"probe_acc": 1.0, "grad_norm": 0.5, "attention_entropy": -0.25})
    # a: probe n = [0, .5, 1], grad n = [0, 1, .5], entropy n = [nan, 1, 0] (weight < 0: 1 - n)
    assert rows[0].score == pytest.approx((1 * 0 + 0.5 * 0) / 1.5)  # layer 0: no entropy term
    assert rows[1].score == pytest.approx((1 * 0.5 + 0.5 * 1 + 0.25 * 0) / 1.75)
    assert rows[2].score == pytest.approx((1 * 1 + 0.5 * 0.5 + 0.25 * 1) / 1.75)
    # b: equal grad norms carry no information (0.5 each); one entropy value -> 0.5
    assert rows[3].score == pytest.approx((0 + 0.5 * 0.5) / 1.5)
    assert rows[4].score == pytest.approx((1 * 1 + 0.5 * 0.5 + 0.25 * 0.5) / 1.75)
    assert minmax([nan, 2.0, 2.0]) == [pytest.approx(nan, nan_ok=True), 0.5, 0.5]
    assert all(0 <= r.score <= 1 for r in rows)


def test_minmax_treats_float_noise_as_a_tie():
    assert minmax([0.9, 0.9 + 1e-9, 0.9]) == [0.5, 0.5, 0.5]  # not [0, 1, 0]
    assert minmax([2e6, 2e6 + 1.0, 2e6]) == [0.5, 0.5, 0.5]  # relative: large values too
    assert minmax([0.9, 0.91, 0.9]) == [0.0, pytest.approx(1.0), 0.0]  # a real difference stays


def test_scores_need_a_measured_component():
    # entropy is the only weighted component, and it was not measured (attention_samples=0)
    rows = _rows("a", [1.0, 2.0], [math.nan, math.nan], [0.5, 0.6])
    with pytest.raises(
        ConfigError, match=r"no layer of encoder 'a' could be scored.*attention_entropy"
    ):
        combine(rows, {"probe_acc": 0.0, "grad_norm": 0.0, "attention_entropy": -0.25})
    with pytest.raises(ConfigError, match="attention_samples=0 switches attention entropy off"):
        LayerImportance(attention_samples=0, weights={"probe_acc": 0, "grad_norm": 0})


def test_table_files_are_replaced_whole(tmp_path):
    rows = combine(_rows("a", [1.0, 2.0], [math.nan, 1.0], [0.5, 0.7]), {"probe_acc": 1.0})
    csv_path, json_path = write_table(rows, tmp_path, meta={"run": 1})
    before = (csv_path.read_bytes(), json_path.read_bytes())
    with pytest.raises(TypeError):  # a failed write (here: meta JSON cannot encode) changes nothing
        write_table(rows[:1], tmp_path, meta={"run": object()})
    assert (csv_path.read_bytes(), json_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["importance.csv", "importance.json"]
    assert [r.probe_acc for r in read_table(csv_path)] == [0.5, 0.7]
    assert json.loads(json_path.read_text())["run"] == 1


def test_scored_train_subset_is_stratified():
    # 1000 rows, class 2 is rare (5 rows): a plain random 50-row subset often loses it
    labels = torch.tensor([0] * 600 + [1] * 395 + [2] * 5)[
        torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    ]
    for seed in range(20):
        rows = stratified_rows(labels, 50, seed)
        assert len(rows) == 50 and len(set(rows.tolist())) == 50
        assert rows.tolist() == sorted(rows.tolist())
        counts = torch.bincount(labels[rows], minlength=3).tolist()
        assert counts[2] >= 1 and abs(counts[0] - 30) <= 1 and abs(counts[1] - 19.75) <= 1.25, (
            counts
        )
    assert torch.equal(stratified_rows(labels, 50, 7), stratified_rows(labels, 50, 7))


SCORES = {"a": {0: 0.1, 1: 0.9, 2: 0.4, 3: 0.4, 4: 0.2}, "b": {0: 0.0, 1: 0.3, 2: 0.7}}


def test_top_k_per_encoder():
    assert select_top_k(SCORES, 2) == {"a": [1, 3], "b": [1, 2]}  # 0.4 tie: the deeper layer wins
    assert select_top_k(SCORES, {"a": 1, "b": 5}) == {"a": [1], "b": [0, 1, 2]}
    with pytest.raises(ConfigError, match="no k given for encoder 'b'"):
        select_top_k(SCORES, {"a": 1})


def test_cumulative_takes_the_smallest_set_reaching_the_share():
    # a: total 2.0; 0.9 < 1.0 <= 0.9 + 0.4 -> two layers. b: total 1.0; 0.7 >= 0.5 -> one layer
    assert select_cumulative(SCORES, 0.5) == {"a": [1, 3], "b": [2]}
    assert select_cumulative(SCORES, 1.0) == {
        "a": [0, 1, 2, 3, 4],
        "b": [1, 2],
    }  # a zero score adds nothing
    assert select_cumulative(SCORES, 0.01) == {"a": [1], "b": [2]}
    with pytest.raises(ConfigError, match="share"):
        select_cumulative(SCORES, 0.0)


def test_fixed_resolves_negative_indices_and_checks_depth():
    assert select_fixed({"a": [-1, 2]}, {"a": 5, "b": 3}) == {"a": [2, 4], "b": [0, 1, 2]}
    with pytest.raises(ConfigError, match="has layers 0..2"):
        select_fixed({"b": [3]}, {"a": 5, "b": 3})


def test_callback_arguments_are_validated():
    with pytest.raises(ConfigError, match="unknown importance component 'entropy'"):
        LayerImportance(weights={"entropy": 1.0})
    with pytest.raises(ConfigError, match="all zero"):
        LayerImportance(weights={"probe_acc": 0, "grad_norm": 0, "attention_entropy": 0})
    with pytest.raises(ConfigError, match="attention_samples"):
        LayerImportance(attention_samples=-1)
    with pytest.raises(ConfigError, match="max_dev_rows must be an integer >= 2 or None, got 1"):
        LayerImportance(max_dev_rows=1)
    with pytest.raises(ConfigError, match="max_train_rows must be an integer >= 2"):
        LayerImportance(max_train_rows=2.5)
    with pytest.raises(ConfigError, match="strategy"):
        LayerSelection(strategy="best")
    with pytest.raises(ConfigError, match="needs `layers`"):
        LayerSelection(strategy="fixed")
    with pytest.raises(ConfigError, match="share"):
        LayerSelection(strategy="cumulative", share=1.5)


# -- the callbacks in a Trainer ------------------------------------------------------------------


def _specs(tiny_models):
    return [
        EncoderSpec(tiny_models["bert"], max_length=32, alias="bert"),
        EncoderSpec(tiny_models["gpt2"], pooling="last", max_length=32, alias="gpt2"),
    ]


def _build(tiny_models, data_dir, cache_dir):
    dm = TextClassificationDataModule(
        dataset=str(data_dir), encoders=_specs(tiny_models), batch_size=32, eval_batch_size=64
    )
    model = LayerFusionModule(
        _specs(tiny_models),
        label_names=dm.label_names,
        cache_dir=str(cache_dir),
        cache_dtype="float32",
        hidden=16,
    )
    return dm, model


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature cache for this module's fits (entries are keyed by model, texts and split)."""
    return tmp_path_factory.mktemp("importance-cache")


def _fit(tmp_path, tiny_models, data_dir, cache, callbacks, **kw):
    L.seed_everything(0)
    dm, model = _build(tiny_models, data_dir, cache)
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=tmp_path / "run",
        callbacks=callbacks,
    )
    trainer = L.Trainer(**{**args, **kw})
    trainer.fit(model, dm)
    return trainer, model, dm


def _importance(**kw):
    """Scoring settings small enough for tiny models; not cached unless a test asks (each test scores)."""
    kw = {"attention_samples": 24, "attention_batch_size": 8, "max_iter": 30, "cache": False, **kw}
    return LayerImportance(**kw)


def test_importance_table_selection_and_checkpoint_round_trip(
    tmp_path, tiny_models, sst2_slice, cache
):
    importance, selection = (
        _importance(),
        LayerSelection(strategy="top_k", k={"bert": 1, "gpt2": 2}),
    )
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="best", monitor="val_acc", mode="max"
    )
    trainer, model, dm = _fit(
        tmp_path, tiny_models, sst2_slice, cache, [selection, importance, ckpt]
    )

    chosen = model.selection
    assert len(chosen["bert"]) == 1 and len(chosen["gpt2"]) == 2 and chosen == selection.selection
    assert all(p.requires_grad for p in model.head.parameters())  # the rebuilt head is what trained
    best = {
        e: sorted(
            sorted(
                (r for r in importance.table if r.encoder == e), key=lambda r: (-r.score, -r.layer)
            )[:n],
            key=lambda r: r.layer,
        )
        for e, n in (("bert", 1), ("gpt2", 2))
    }
    assert {e: [r.layer for r in rs] for e, rs in best.items()} == chosen

    # scoring left the module's validation features alone (float32 cache on the CPU: `.to` is a no-op,
    # so an in-place z-scoring would have edited them): validating the best checkpoint afresh gives
    # exactly the val_loss and val_acc that fit saw
    fit_metrics = {k: trainer.callback_metrics[k].item() for k in ("val_loss", "val_acc")}
    dm_v, fresh_v = _build(tiny_models, sst2_slice, cache)
    again = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    again = again.validate(fresh_v, dm_v, ckpt_path=ckpt.best_model_path, verbose=False)[0]
    assert again["val_acc"] == fit_metrics["val_acc"] == ckpt.best_model_score.item()
    assert again["val_loss"] == pytest.approx(fit_metrics["val_loss"], rel=1e-6)

    # the table: every (encoder, layer), layer 0 without entropy, written to the run dir, `selected` set
    table = read_table(tmp_path / "run" / "importance.csv")
    assert [(r.encoder, r.layer) for r in table] == [
        (e, i) for e in ("bert", "gpt2") for i in range(3)
    ]
    assert all(math.isnan(r.attention_entropy) == (r.layer == 0) for r in table)
    assert all(r.attention_entropy > 0 and r.grad_norm > 0 for r in table if r.layer)
    # probe_acc is a real dev accuracy: a count out of the 80 dev rows, equal (to one row: L-BFGS on
    # re-standardised inputs) to a probe fitted here on the cached features of that layer
    assert all(round(r.probe_acc * 80) == pytest.approx(r.probe_acc * 80, abs=1e-4) for r in table)
    key = model.encoders["bert"]
    feats = {s: model.cache.load_or_build(key, dm.texts(s), s) for s in ("train", "val")}
    for layer in range(3):
        direct = probe_accuracy(
            feats["train"][:, layer].float(),
            torch.tensor(dm.label_ids("train")),
            feats["val"][:, layer].float(),
            torch.tensor(dm.label_ids("val")),
            num_classes=2,
            max_iter=30,
        )
        assert table[layer].probe_acc == pytest.approx(direct, abs=1.01 / 80)
    assert {
        e: [r.layer for r in table if r.encoder == e and r.selected] for e in ("bert", "gpt2")
    } == chosen
    meta = json.loads((tmp_path / "run" / "importance.json").read_text())
    assert (
        meta["selection"] == chosen
        and meta["rows"][0]["attention_entropy"] is None
        and "score(l)" in meta["formula"]
    )

    # the checkpoint carries the selection (module) and the table (callback state); test restores the head
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    assert saved["layerfusion"]["selection"] == chosen
    assert saved["callbacks"]["LayerImportance"]["table"][0]["encoder"] == "bert"
    dm2, fresh = _build(tiny_models, sst2_slice, cache)
    assert fresh.selection != chosen
    tester = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    result = tester.test(fresh, dm2, ckpt_path=ckpt.best_model_path, verbose=False)[0]
    assert fresh.selection == chosen
    # the restored head is the trained one (one epoch: the best checkpoint is the final state)
    reference = tester.test(model, dm2, verbose=False)[0]
    assert result == pytest.approx(reference, rel=1e-6)
    # a plain state dict also names its layers: loading it rebuilds the head (ddp_spawn hands weights back so)
    plain = LayerFusionModule(
        _specs(tiny_models),
        label_names=dm2.label_names,
        cache_dir=str(cache),
        hidden=16,
    )
    plain.load_state_dict(saved["state_dict"])
    assert plain.selection == chosen


def test_importance_is_cached_under_its_inputs(
    tmp_path, tiny_models, sst2_slice, monkeypatch, caplog
):
    cache_dir = tmp_path / "cache"
    fit = dict(limit_train_batches=1, limit_val_batches=1)
    first = _importance(cache=True)
    _fit(tmp_path / "1", tiny_models, sst2_slice, cache_dir, [first], **fit)
    entries = list((cache_dir / "importance").glob("*.json"))
    assert entries == [first.cache_path] and first.seconds["probe_acc"] > 0

    # same inputs: read back, nothing scored (scoring would trip these)
    def scored(*args, **kw):
        raise AssertionError("scored again despite a valid cache entry")

    with monkeypatch.context() as m:
        m.setattr("layerfusion.callbacks.layer_importance.probe_accuracy", scored)
        m.setattr("layerfusion.callbacks.layer_importance.encoder_attention_entropy", scored)
        again = _importance(cache=True)
        _fit(tmp_path / "2", tiny_models, sst2_slice, cache_dir, [again], **fit)
        assert again.seconds == {}
        assert _nan_safe(again.table) == _nan_safe(first.table)
        # other weights: the same components, combined afresh
        reweighted = _importance(cache=True, weights={"grad_norm": 0.0})
        _fit(tmp_path / "3", tiny_models, sst2_slice, cache_dir, [reweighted], **fit)
        expected = combine([LayerScore(**asdict(r)) for r in first.table], reweighted.weights)
        assert [r.score for r in reweighted.table] == [r.score for r in expected]
        assert [r.score for r in reweighted.table] != [r.score for r in first.table]

    # another scoring setting is another entry; a corrupt entry is reported and rebuilt
    other = _importance(cache=True, max_iter=20)
    _fit(tmp_path / "4", tiny_models, sst2_slice, cache_dir, [other], **fit)
    assert other.cache_path != first.cache_path and other.seconds
    first.cache_path.write_text('{"key": ')
    rebuilt = _importance(cache=True)
    with caplog.at_level("WARNING"):
        _fit(tmp_path / "5", tiny_models, sst2_slice, cache_dir, [rebuilt], **fit)
    assert "importance cache entry" in caplog.text and "unusable" in caplog.text
    assert rebuilt.seconds and json.loads(first.cache_path.read_text())["rows"]
    assert [(r.encoder, r.layer, r.probe_acc) for r in rebuilt.table] == [
        (r.encoder, r.layer, r.probe_acc) for r in first.table
    ]

    # the sample is in the key (its size, seed, texts and labels): another sample is another entry;
    # a hit extracts nothing at all
    sampled = _importance(cache=True, max_train_rows=100)
    spy, _ = _fit_spied(tmp_path / "6", tiny_models, sst2_slice, cache_dir, sampled)
    assert spy.before_module_setup == 2 and len(spy.calls[0][1]) == 100
    assert sampled.cache_path not in (first.cache_path, other.cache_path)
    reseeded = _importance(cache=True, max_train_rows=100, seed=1)
    _fit_spied(tmp_path / "7", tiny_models, sst2_slice, cache_dir, reseeded)
    assert reseeded.cache_path != sampled.cache_path
    hit = _importance(cache=True, max_train_rows=100)
    spy, _ = _fit_spied(tmp_path / "8", tiny_models, sst2_slice, cache_dir, hit)
    assert spy.before_module_setup == 0 and hit.seconds == {}
    assert hit.cache_path == sampled.cache_path and _nan_safe(hit.table) == _nan_safe(sampled.table)


def _nan_safe(table: list[LayerScore]) -> str:
    """A table as JSON text: equal tables compare equal even with NaN cells."""
    return json.dumps([asdict(r) for r in table])


def _poison_test_split(src: Path, dst: Path) -> Path:
    """A copy of the dataset whose test split has garbage texts and shuffled labels."""
    shutil.copytree(src, dst)
    rows = [json.loads(line) for line in (dst / "test.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in rows]
    random.Random(1).shuffle(labels)
    poisoned = [
        {"text": f"zzz {i} qqq " * (i % 7 + 1), "label": lab} for i, lab in enumerate(labels)
    ]
    (dst / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in poisoned))
    return dst


def test_scoring_and_selection_never_read_the_test_split(tmp_path, tiny_models, sst2_slice, cache):
    poisoned = _poison_test_split(sst2_slice, tmp_path / "poisoned")
    results = []
    for name, data in (("clean", sst2_slice), ("poisoned", poisoned)):
        importance, selection = _importance(), LayerSelection(strategy="cumulative", share=0.6)
        _, model, dm = _fit(
            tmp_path / name,
            tiny_models,
            data,
            cache,
            [importance, selection],
            max_epochs=1,
            limit_train_batches=1,
            limit_val_batches=1,
        )
        assert "test" not in dm.splits and "test" not in model.features  # never even loaded
        results.append(
            (json.dumps([asdict(r) for r in importance.table]), model.selection)
        )  # NaN-safe equality
    assert (
        results[0] == results[1]
    )  # same seed, other test split: the same table and selection, exactly


def test_callback_order_does_not_matter_and_fixed_needs_no_scores(
    tmp_path, tiny_models, sst2_slice, cache
):
    selections = []
    for i, order in enumerate(((0, 1), (1, 0))):
        cbs = [_importance(), LayerSelection(strategy="top_k", k=2)]
        _, model, _ = _fit(
            tmp_path / str(i),
            tiny_models,
            sst2_slice,
            cache,
            [cbs[j] for j in order],
            limit_train_batches=1,
            limit_val_batches=1,
        )
        # the head trains on the top 2 of the table the importance callback holds
        assert model.selection == select_top_k(scores_by_encoder(cbs[0].table), 2)
        selections.append(model.selection)
    assert selections[0] == selections[1]

    fixed = LayerSelection(strategy="fixed", layers={"bert": [-1], "gpt2": [0, 2]})
    _, model, _ = _fit(
        tmp_path / "fixed",
        tiny_models,
        sst2_slice,
        cache,
        [fixed],
        limit_train_batches=1,
        limit_val_batches=1,
    )
    assert model.selection == {"bert": [2], "gpt2": [0, 2]}
    with pytest.raises(ConfigError, match="needs exactly one LayerImportance"):
        _fit(tmp_path / "none", tiny_models, sst2_slice, cache, [LayerSelection(strategy="top_k")])


# -- scoring on a sample -------------------------------------------------------------------------


class ExtractSpy(L.Callback):
    """Records the module's `extract_split` calls (a wrapper around the real method: the encoders run);
    placed after `LayerImportance`, its `setup` notes what scoring had extracted and what the module
    held by then (the module's own `setup` runs after every callback's)."""

    def __init__(self, model: LayerFusionModule) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.before_module_setup: int | None = None
        self.module_features: list[str] | None = None
        real = model.extract_split

        def extract_split(texts, split, *args, **kw):
            self.calls.append((split, list(texts)))
            return real(texts, split, *args, **kw)

        model.extract_split = extract_split

    def setup(self, trainer, pl_module, stage) -> None:
        self.before_module_setup = len(self.calls)
        self.module_features = sorted(pl_module.features)


def _fit_spied(tmp_path, tiny_models, data_dir, cache, importance, **kw):
    """`_fit` with an `ExtractSpy` after `importance`; (spy, datamodule)."""
    L.seed_everything(0)
    dm, model = _build(tiny_models, data_dir, cache)
    spy = ExtractSpy(model)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=tmp_path / "run",
        callbacks=[importance, spy],
        **kw,
    )
    trainer.fit(model, dm)
    return spy, dm


def _subset_dataset(src: Path, dst: Path, rows: dict[str, list[int]]) -> Path:
    """A copy of the dataset whose train and dev splits hold only `rows[split]` (in row order)."""
    shutil.copytree(src, dst)
    for split, name in (("train", "train.jsonl"), ("val", "dev.jsonl")):
        lines = (dst / name).read_text(encoding="utf-8").splitlines()
        (dst / name).write_text("".join(lines[i] + "\n" for i in rows[split]), encoding="utf-8")
    return dst


def test_importance_scores_a_stratified_sample_and_extracts_only_its_rows(
    tmp_path, tiny_models, sst2_slice, cache
):
    importance = _importance(max_train_rows=60, max_dev_rows=30, seed=5)
    spy, dm = _fit_spied(tmp_path / "sample", tiny_models, sst2_slice, cache, importance)

    # scoring extracted the two samples, every layer, before the module's setup, and nothing else; it
    # did not make the module extract (or hold) anything
    assert spy.before_module_setup == 2 and spy.module_features == []
    (train_split, train_texts), (dev_split, dev_texts) = spy.calls[:2]
    rows = {
        s: stratified_rows(torch.tensor(dm.label_ids(s)), n, 5).tolist()
        for s, n in (("train", 60), ("val", 30))
    }
    assert (train_split, dev_split) == ("train", "val")
    assert train_texts == [dm.texts("train")[i] for i in rows["train"]]
    assert dev_texts == [dm.texts("val")[i] for i in rows["val"]]
    # stratified by class, seeded: another seed draws other rows in the same class proportions
    labels = torch.tensor(dm.label_ids("train"))
    share = torch.bincount(labels, minlength=2) * 60 / len(labels)
    assert (torch.bincount(labels[rows["train"]], minlength=2) - share).abs().max() <= 1
    other = LayerImportance(max_train_rows=60, seed=6)._sample(dm, "train", 60)[0]
    assert (
        other != train_texts and LayerImportance(seed=5)._sample(dm, "train", 60)[0] == train_texts
    )
    # the probes are scored on the 30 dev rows of the sample: accuracies are counts out of 30
    assert all(
        round(r.probe_acc * 30) == pytest.approx(r.probe_acc * 30, abs=1e-4)
        for r in importance.table
    )

    # the sample's table is the table of a dataset made of exactly those rows, scored whole
    subset = _subset_dataset(sst2_slice, tmp_path / "subset", rows)
    whole = _importance(max_train_rows=None, max_dev_rows=None, seed=5)
    _fit_spied(tmp_path / "subset-run", tiny_models, subset, cache, whole)
    assert _nan_safe(whole.table) == _nan_safe(importance.table)


def test_a_sample_as_large_as_the_split_is_the_split(tmp_path, tiny_models, sst2_slice, cache):
    """Limits at (or above) the split sizes score the whole splits: the same texts as the module's own
    extraction (one cache entry serves both) and the same table as no limit at all."""
    tables = []
    for limits in ((200, 80), (None, None)):
        importance = _importance(max_train_rows=limits[0], max_dev_rows=limits[1])
        spy, dm = _fit_spied(tmp_path / str(limits[0]), tiny_models, sst2_slice, cache, importance)
        assert spy.calls[:2] == [("train", dm.texts("train")), ("val", dm.texts("val"))]
        tables.append(_nan_safe(importance.table))
    assert tables[0] == tables[1]


# -- DDP ------------------------------------------------------------------------------------------


class RecordSelection(L.Callback):
    """Write what each rank holds at fit start: the head's layers and the importance table."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_start(self, trainer, pl_module) -> None:
        table = next(c for c in trainer.callbacks if isinstance(c, LayerImportance)).table
        rows = [
            [r.encoder, r.layer, r.grad_norm, r.attention_entropy, r.probe_acc, r.score]
            for r in table
        ]
        record = {"selection": pl_module.selection, "table": rows, "world": trainer.world_size}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_spawn_ranks_score_alike_and_select_the_same_layers(
    tmp_path, tiny_models, sst2_slice, cache
):
    def run(devices: int, strategy: str, out: Path):
        out.mkdir()
        # scored on samples (extracted, sharded, on both ranks) of 120 train and 60 dev rows
        importance = _importance(max_train_rows=120, max_dev_rows=60)
        cbs = [importance, LayerSelection(strategy="top_k", k=1), RecordSelection(str(out))]
        cbs.append(RecordCollectives(str(out / "probe")))
        return _fit(
            out,
            tiny_models,
            sst2_slice,
            cache,
            cbs,
            devices=devices,
            strategy=strategy,
            limit_train_batches=2,
            limit_val_batches=1,
        )

    _, model, _ = run(2, "ddp_spawn", tmp_path / "ddp")
    # every collective of the scoring (sample extraction, probes, scoring head, gradients): what NCCL accepts
    assert collectives_nccl_accepts(tmp_path / "ddp" / "probe", "fit") > 0
    rank0, rank1 = (json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2))
    assert (
        rank0["world"] == 2
        and rank0["selection"] == rank1["selection"]
        and rank0["table"] == rank1["table"]
    )
    assert model.selection == rank0["selection"]  # the main process got the selected head back
    assert (
        json.loads((tmp_path / "ddp" / "run" / "importance.json").read_text())["selection"]
        == rank0["selection"]
    )

    run(1, "auto", tmp_path / "single")  # the reduced scores equal a single-process run's
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert single["selection"] == rank0["selection"]
    for a, b in zip(single["table"], rank0["table"], strict=True):
        assert a[:2] == b[:2]
        assert a[2:] == pytest.approx(b[2:], rel=1e-4, abs=1e-6, nan_ok=True)
