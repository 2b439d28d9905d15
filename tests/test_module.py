"""LayerFusionModule with a real Trainer on tiny encoders: frozen encoders, head-only checkpoints,
exact restore, cached == online, precision."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.errors import ConfigError
from layerfusion.module import LayerFusionModule


def _specs(tiny_models):
    return [
        EncoderSpec(tiny_models["bert"], max_length=32, alias="bert"),
        EncoderSpec(tiny_models["gpt2"], pooling="last", max_length=32, alias="gpt2"),
    ]


def _build(tiny_models, data_dir, cache_dir, features="cached", **model_kw):
    dm = TextClassificationDataModule(
        dataset=str(data_dir),
        encoders=_specs(tiny_models),
        features=features,
        batch_size=16,
        eval_batch_size=32,
    )
    model = LayerFusionModule(
        _specs(tiny_models),
        label_names=dm.label_names,
        features=features,
        cache_dir=str(cache_dir),
        cache_dtype="float32",
        hidden=16,
        **model_kw,
    )
    return dm, model


def _trainer(tmp_path, **kw):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=tmp_path,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)


def test_fit_trains_only_the_head(tmp_path, tiny_models, sst2_slice):
    L.seed_everything(0)
    dm, model = _build(tiny_models, sst2_slice, tmp_path / "cache")
    encoders_before = {k: v.clone() for k, v in model.encoders.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    _trainer(tmp_path, enable_checkpointing=False).fit(model, dm)
    for k, v in model.encoders.state_dict().items():
        assert torch.equal(v, encoders_before[k]), f"encoder tensor {k} changed"
    assert all(p.grad is None and not p.requires_grad for p in model.encoders.parameters())
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    assert not model.features  # cleared on teardown
    hooked = [m for enc in model.encoders.values() for m in enc.model.modules() if m._forward_hooks]
    assert not hooked, "teardown removes every tap"
    # a later stage on the same module taps again
    online = _trainer(tmp_path).predict(model, dm)
    assert torch.cat([o["probs"] for o in online]).shape == (80, 2)


def test_checkpoint_is_head_only_and_restores_exactly(tmp_path, tiny_models, sst2_slice):
    L.seed_everything(0)
    dm, model = _build(tiny_models, sst2_slice, tmp_path / "cache")
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="best", monitor="val_acc", mode="max"
    )
    losses = ValLossPerEpoch()
    _trainer(tmp_path, callbacks=[ckpt, losses], max_epochs=3).fit(model, dm)

    saved = torch.load(ckpt.best_model_path, weights_only=True)  # plain data, no pickled objects
    assert saved["state_dict"] and all(k.startswith("head.") for k in saved["state_dict"])
    meta = saved["layerfusion"]
    assert meta["label_names"] == ["0", "1"] and set(meta["encoders"]) == {"bert", "gpt2"}
    assert meta["selection"] == {"bert": [0, 1, 2], "gpt2": [0, 1, 2]}

    dm2, fresh = _build(tiny_models, sst2_slice, tmp_path / "cache")
    assert any(
        not torch.equal(v, saved["state_dict"][f"head.{k}"])
        for k, v in fresh.head.state_dict().items()
    )
    metrics = _trainer(tmp_path).validate(
        fresh, dm2, ckpt_path=ckpt.best_model_path, verbose=False
    )[0]
    # the head is the saved one, tensor for tensor, and gives the val_loss it had when it was saved
    restored = fresh.head.state_dict()
    assert restored.keys() == {k[len("head.") :] for k in saved["state_dict"]}
    for k, v in restored.items():
        assert torch.equal(v, saved["state_dict"][f"head.{k}"]), k
    assert metrics["val_acc"] == ckpt.best_model_score.item()
    assert metrics["val_loss"] == pytest.approx(losses.val_loss[saved["epoch"]], rel=1e-6)


class ValLossPerEpoch(L.Callback):
    """`val_loss` of every training epoch, by epoch."""

    def __init__(self) -> None:
        self.val_loss: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_loss[trainer.current_epoch] = trainer.callback_metrics["val_loss"].item()


def test_cached_and_online_features_give_the_same_predictions(tmp_path, tiny_models, sst2_slice):
    L.seed_everything(0)
    dm_c, cached = _build(tiny_models, sst2_slice, tmp_path / "cache")
    dm_o, online = _build(tiny_models, sst2_slice, tmp_path / "cache", features="online")
    online.head.load_state_dict(cached.head.state_dict())
    trainer = _trainer(tmp_path)
    p_cached = torch.cat([p["probs"] for p in trainer.predict(cached, dm_c)])
    p_online = torch.cat([p["probs"] for p in _trainer(tmp_path).predict(online, dm_o)])
    assert p_cached.shape == (80, 2)
    torch.testing.assert_close(p_cached, p_online, atol=1e-4, rtol=1e-4)


def test_checkpoint_from_other_labels_or_encoders_is_refused(tmp_path, tiny_models, sst2_slice):
    dm, model = _build(tiny_models, sst2_slice, tmp_path / "cache")
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    relabelled = LayerFusionModule(
        _specs(tiny_models), label_names=["neg", "pos"], cache_dir=str(tmp_path)
    )
    with pytest.raises(ConfigError, match=r"checkpoint labels \['0', '1'\] differ"):
        relabelled.on_load_checkpoint(checkpoint)
    other = LayerFusionModule(
        [EncoderSpec(tiny_models["roberta"], alias="bert"), _specs(tiny_models)[1]],
        label_names=["0", "1"],
        cache_dir=str(tmp_path),
    )
    with pytest.raises(ConfigError, match="trained on encoders"):
        other.on_load_checkpoint(checkpoint)
    with pytest.raises(KeyError, match="outside the head"):
        model.load_state_dict({"encoders.bert.x": torch.zeros(1)})


def test_bf16_mixed_trains_on_cpu(tmp_path, tiny_models, sst2_slice):
    L.seed_everything(0)
    dm, model = _build(tiny_models, sst2_slice, tmp_path / "cache")
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    trainer = _trainer(tmp_path, precision="bf16-mixed", max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    trainable = [n for n, p in model.head.named_parameters() if p.requires_grad]
    changed = [n for n in trainable if not torch.equal(model.head.state_dict()[n], before[n])]
    assert changed == trainable  # every head parameter took optimizer steps
    assert all(p.dtype == torch.float32 for p in model.head.parameters())  # fp32 master weights


class RestoreAfterSetup(SingleDeviceStrategy):
    """A single-device strategy that, like FSDP, restores a checkpoint only after it has set the model up."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_other_selection_is_refused_where_the_strategy_restores_after_setup(
    tmp_path, tiny_models, sst2_slice
):
    L.seed_everything(0)
    dm, model = _build(tiny_models, sst2_slice, tmp_path / "cache")
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, dm)
    ckpt = tmp_path / "all_layers.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = r"checkpoint's head reads layers .*too late to rebuild the head: set model.layers"

    # resuming with another selection would rebuild the head after the optimizer was built: refused
    dm2, other = _build(
        tiny_models, sst2_slice, tmp_path / "cache", layers={"bert": [1], "gpt2": [2]}
    )
    late = _trainer(tmp_path, max_epochs=2, strategy=RestoreAfterSetup(torch.device("cpu")))
    with pytest.raises(ConfigError, match=expected):
        late.fit(other, dm2, ckpt_path=ckpt)
    # the FSDP preset checks before FSDP loads the weights into the wrapped model
    from layerfusion.strategies import FrozenEncoderFSDPStrategy

    fsdp = FrozenEncoderFSDPStrategy()
    fsdp._lightning_module = other
    with pytest.raises(ConfigError, match=expected):
        fsdp.load_checkpoint(ckpt)
    # the same selection restores as usual under that ordering
    dm3, same = _build(tiny_models, sst2_slice, tmp_path / "cache")
    late = _trainer(tmp_path, max_epochs=2, strategy=RestoreAfterSetup(torch.device("cpu")))
    late.fit(same, dm3, ckpt_path=ckpt)
    assert late.current_epoch == 2 and same.selection == model.selection
