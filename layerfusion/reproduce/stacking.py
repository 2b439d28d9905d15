"""The stacking bound: how much of the two encoders' oracle headroom a learned combiner of their probes reaches.

A multinomial logistic regression on the concatenated `linear_probe` log-probabilities of the encoders,
fitted on dev only and cross-fitted: dev is split into `folds` stratified folds; each fold's dev predictions
come from the model fitted on the other folds (so the dev accuracy is out of fold), and the test prediction
is the argmax of the fold models' mean probability. Test labels are never seen.
"""

from __future__ import annotations

import numpy as np

FOLDS = 5
L2 = 1e-3


def stratified_folds(labels, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold number of each row: each class's rows shuffled (seeded) and dealt round-robin."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        fold[rows] = (np.arange(len(rows)) + offset) % folds
        offset += len(rows)  # small classes do not all start in fold 0
    return fold


def stack(
    logp_val: list[np.ndarray],
    gold_val,
    logp_test: list[np.ndarray],
    folds: int = FOLDS,
    l2: float = L2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """`{"val": out-of-fold dev predictions, "test": test predictions}` of the cross-fitted stacker.

    `logp_val` / `logp_test`: per encoder `[rows, classes]` log-probabilities of its probe."""
    import torch
    from torch import nn

    from layerfusion.fusion.lbfgs import fit_lbfgs

    x_val = torch.from_numpy(np.concatenate(logp_val, 1)).double()
    x_test = torch.from_numpy(np.concatenate(logp_test, 1)).double()
    y = torch.as_tensor(np.asarray(gold_val), dtype=torch.long)
    classes = logp_val[0].shape[1]
    fold = stratified_folds(gold_val, folds, seed)
    out_val = np.empty(len(y), dtype=np.int64)
    test_prob = torch.zeros(len(x_test), classes, dtype=torch.float64)
    for k in range(folds):
        train = torch.from_numpy(fold != k)
        model = nn.Linear(x_val.shape[1], classes).double()
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        fit_lbfgs(model, x_val[train], y[train], l2, max_iter=500)
        with torch.no_grad():
            out_val[~train.numpy()] = model(x_val[~train]).argmax(-1).numpy()
            test_prob += torch.softmax(model(x_test), -1) / folds
    return {"val": out_val, "test": test_prob.argmax(-1).numpy()}
