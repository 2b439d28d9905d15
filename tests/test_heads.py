"""Fusion heads: shapes, gradients to every parameter, layer selection checks."""

from __future__ import annotations

import pytest
import torch

from layerfusion.errors import ConfigError
from layerfusion.fusion.heads import HEADS, GatedFusionHead, build_head, resolve_layers

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = {"small": 8, "big": 16}
NUM_LAYERS = {"small": 4, "big": 6}


def _features(batch: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {e: torch.randn(batch, NUM_LAYERS[e], d) for e, d in DIMS.items()}


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_gives_logits_and_trains_every_parameter(kind):
    layers = {"small": [2], "big": [5]} if kind == "single_layer" else None
    head = build_head(kind, DIMS, NUM_LAYERS, layers, num_classes=3, hidden=12)
    logits = head(_features())
    assert logits.shape == (5, 3)
    logits.logsumexp(-1).sum().backward()
    # DDP (find_unused_parameters=False) needs every trainable parameter in every step's graph
    unused = [n for n, p in head.named_parameters() if p.grad is None]
    assert not unused


def test_gated_head_mixes_layers_and_gates_per_example():
    head = GatedFusionHead(DIMS, {"small": [1, 3], "big": [0, 2, 5]}, num_classes=2, hidden=12)
    head.eval()(_features())
    assert head.last_gate.shape == (5, 2)
    torch.testing.assert_close(head.last_gate.sum(-1), torch.ones(5))
    # a gate per example, not one per batch: examples get different gates...
    assert (head.last_gate - head.last_gate[0]).abs().amax(0).min() > 1e-4
    # ...and an example's gate depends on that example only
    first = head.last_gate[0].clone()
    head({e: x[:1] for e, x in _features().items()})
    torch.testing.assert_close(head.last_gate[0], first)
    weights = head.layer_weights()
    assert [len(weights["small"]), len(weights["big"])] == [2, 3]
    torch.testing.assert_close(weights["big"].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_head_reads_only_its_selected_layers(kind):
    head = build_head(
        kind, DIMS, NUM_LAYERS, {"small": [1], "big": [2]}, num_classes=2, hidden=12
    ).eval()
    read = head.layers["small"][0]  # 1, or the last layer (3) for `last_layer`
    assert read == (3 if kind == "last_layer" else 1)
    feats = _features()
    before = head(feats)
    for unread in set(range(NUM_LAYERS["small"])) - {read}:  # every unselected layer
        feats["small"][:, unread] += 100.0 * torch.randn_like(feats["small"][:, unread])
    torch.testing.assert_close(head(feats), before)
    feats["small"][:, read] += torch.randn_like(feats["small"][:, read])  # the selected one
    assert not torch.allclose(head(feats), before)


def test_resolve_layers():
    assert resolve_layers("gated", NUM_LAYERS, None) == {
        "small": [0, 1, 2, 3],
        "big": [0, 1, 2, 3, 4, 5],
    }
    assert resolve_layers("last_layer", NUM_LAYERS, None) == {"small": [3], "big": [5]}
    assert resolve_layers("gated", NUM_LAYERS, {"small": [-1, 0]})["small"] == [0, 3]
    with pytest.raises(ConfigError, match=r"'big' has layers 0..5.*\[9\]"):
        resolve_layers("gated", NUM_LAYERS, {"big": [9]})
    with pytest.raises(ConfigError, match="unknown encoders"):
        resolve_layers("gated", NUM_LAYERS, {"nope": [1]})


def test_bad_head_configs_are_named():
    with pytest.raises(ConfigError, match="unknown head 'mlp'"):
        build_head("mlp", DIMS, NUM_LAYERS, None, 2)
    with pytest.raises(ConfigError, match="exactly one layer per encoder"):
        build_head("single_layer", DIMS, NUM_LAYERS, {"small": [1, 2], "big": [1]}, 2)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_head("gated", DIMS, NUM_LAYERS, None, 1)


def test_gated_head_for_minilm_and_mpnet_is_small():
    head = build_head(
        "gated", {"minilm": 384, "mpnet": 768}, {"minilm": 7, "mpnet": 13}, None, num_classes=52
    )
    params = sum(p.numel() for p in head.parameters())
    # weights + two AdamW moments in fp32 must fit the 5 MB checkpoint budget
    assert params * 4 * 3 < 5e6, params
