"""Statistics of `layerfusion.analysis` against independent references, and the heads added for the
analysis (`linear`, encoder dropout): the linear probe against scikit-learn on real MiniLM features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerfusion import analysis
from layerfusion.fusion.heads import build_head

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    a = np.array([1] * 50 + [1] * 1 + [0] * 9 + [0] * 5, bool)  # 1 row only A right, 9 only B right
    b = np.array([1] * 50 + [0] * 1 + [1] * 9 + [0] * 5, bool)
    expected = 2 * (math.comb(10, 0) + math.comb(10, 1)) / 2**10  # 0.021484375
    assert analysis.mcnemar_exact(a, b) == pytest.approx(expected)
    assert analysis.mcnemar_exact(b, a) == pytest.approx(expected)
    assert analysis.mcnemar_exact(a, a) == 1.0
    balanced = np.array([1, 0] * 5, bool)
    assert analysis.mcnemar_exact(balanced, ~balanced) == 1.0  # 5 vs 5: capped at 1


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    n = 4000
    a = rng.random((2, n)) < 0.80
    b = rng.random((2, n)) < 0.78
    diff, lo, hi = analysis.paired_bootstrap(a, b, samples=4000)
    per_row = (a.astype(float) - b).mean(0)
    assert diff == pytest.approx(per_row.mean())
    se = per_row.std(ddof=1) / math.sqrt(n)
    assert lo == pytest.approx(diff - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(diff + 1.96 * se, abs=0.25 * se)
    assert analysis.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        analysis.paired_bootstrap(a, b[:1])


def test_agreement_counts_oracle_and_kappa():
    from sklearn.metrics import cohen_kappa_score

    gold = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    pa = np.array([0, 1, 2, 1, 1, 0, 0, 2])  # right on rows 0 1 2 4 6
    pb = np.array([0, 2, 2, 0, 0, 2, 1, 1])  # right on rows 0 2 3 5 7
    got = analysis.agreement(pa, pb, gold)
    assert (got["both_right"], got["only_a"], got["only_b"], got["both_wrong"]) == (2, 3, 3, 0)
    assert got["oracle_acc"] == 1.0 and got["acc_a"] == 5 / 8 and got["acc_b"] == 5 / 8
    assert got["kappa"] == pytest.approx(cohen_kappa_score(pa, pb), abs=1e-6)


def test_linear_cka_against_the_feature_space_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g)
    y = x @ torch.randn(20, 8, generator=g) + 0.5 * torch.randn(300, 8, generator=g)

    def reference(x, y):
        x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
        return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))

    assert analysis.linear_cka(x, y) == pytest.approx(reference(x, y), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    assert analysis.linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0, abs=1e-9)  # invariances
    labels, m = analysis.cka_table({"a": torch.stack([x, x @ q], 1), "b": y.unsqueeze(1)})
    assert labels == ["a:0", "a:1", "b:0"]
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
    assert m[0, 2] == pytest.approx(reference(x, y), rel=1e-9)
    constant = torch.ones(300, 5)  # e.g. a CLS token's layer 0: identical for every row
    assert np.isnan(analysis.cka_matrix([x, constant])[0, 1])


def test_encoder_dropout_masks_one_encoder_and_keeps_every_parameter_in_the_graph():
    torch.manual_seed(0)
    dims = {"a": 8, "b": 6}
    head = build_head("gated_encoder_dropout", dims, {"a": 3, "b": 2}, None, 3, hidden=16)
    feats = {"a": torch.randn(64, 3, 8), "b": torch.randn(64, 2, 6)}
    head.train()
    head(feats).sum().backward()
    gate = head.last_gate
    assert gate.sum(1).allclose(torch.ones(64))
    dropped = (gate == 0).any(1)
    assert 10 < int(dropped.sum()) < 54  # about half the examples lose one encoder
    assert ((gate == 0).sum(1) <= 1).all()  # never both
    assert all(p.grad is not None for p in head.parameters())  # DDP find_unused_parameters=False
    head.eval()
    head(feats)
    assert (head.last_gate > 0).all()  # no dropout at evaluation
    plain = build_head("gated", dims, {"a": 3, "b": 2}, None, 3, hidden=16).train()
    plain(feats)
    assert (plain.last_gate > 0).all()  # off by default


@pytest.fixture(scope="module")
def minilm_features(minilm_dir, shared_data):
    """Masked-mean MiniLM features of SST-2 slices (train 500, dev 150, test 400)."""
    import json

    from layerfusion.encoders.frozen import EncoderSpec, FrozenEncoder
    from layerfusion.features.cache import extract

    enc = FrozenEncoder(EncoderSpec(name=minilm_dir, pooling="mean", max_length=48))
    out = {}
    for split, n in (("train", 500), ("dev", 150), ("test", 400)):
        rows = [
            json.loads(line)
            for line in (shared_data / "sst2" / f"{split}.jsonl").read_text().splitlines()[:n]
        ]
        feats = np.zeros((n, enc.num_layers, enc.hidden_size), np.float32)
        extract(enc, [r["text"] for r in rows], feats, 64, "cpu")
        labels = sorted({r["label"] for r in rows})
        out[split] = (
            torch.from_numpy(feats),
            torch.tensor([labels.index(r["label"]) for r in rows]),
        )
    return out


@pytest.mark.slow
def test_linear_probe_matches_scikit_learn_logistic_regression(minilm_features):
    """Same features (layer 5, layer-normalised), same objective, regularisation chosen on dev from the
    same grid: test accuracy within 0.3 points."""
    from sklearn.linear_model import LogisticRegression

    grid = (1e-1, 1e-2, 1e-3)  # the strong end of reproduce's L2_GRID (weak L2 is slow to converge)

    head = build_head("linear", {"m": 384}, {"m": 7}, {"m": [5]}, 2)
    data = {s: ({"m": x}, y) for s, (x, y) in minilm_features.items()}
    inputs = {s: head.inputs(f).detach().numpy() for s, (f, _) in data.items()}
    n = len(data["train"][1])

    weights = {}

    def ours(l2):
        head.fit(data["train"][0], data["train"][1], l2)
        w = head.linear.weight.detach().numpy()
        weights["ours", l2] = w[1] - w[0]
        with torch.no_grad():
            return {s: head(f).argmax(-1).numpy() for s, (f, _) in data.items()}

    def sklearn(l2):
        # two classes: scikit-learn fits one binary weight vector w = W[1] - W[0], ||w||^2 = 2 ||W||^2
        lr = LogisticRegression(C=2 / (l2 * n), max_iter=5000, tol=1e-8)
        lr.fit(inputs["train"], data["train"][1].numpy())
        weights["sklearn", l2] = lr.coef_[0]
        return {s: lr.predict(inputs[s]) for s in data}

    def pick(fit):
        preds = {l2: fit(l2) for l2 in grid}
        dev = {l2: (p["dev"] == data["dev"][1].numpy()).mean() for l2, p in preds.items()}
        best = max(grid, key=lambda l2: dev[l2])  # first maximum: the stronger L2 on ties
        return best, (preds[best]["test"] == data["test"][1].numpy()).mean()

    (l2_ours, acc_ours), (l2_sk, acc_sk) = pick(ours), pick(sklearn)
    assert l2_ours == l2_sk
    assert abs(acc_ours - acc_sk) <= 0.003, (acc_ours, acc_sk)
    assert acc_ours > 0.7  # SST-2 from MiniLM's layer 5: far above the 0.5 of chance
    for l2 in grid:  # the same minimiser, not only the same accuracy
        ours_w, sk_w = weights["ours", l2], weights["sklearn", l2]
        assert np.linalg.norm(ours_w - sk_w) <= 0.02 * np.linalg.norm(sk_w), l2
