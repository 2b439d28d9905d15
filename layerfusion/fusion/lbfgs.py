"""The one full-batch L-BFGS fit of the project: linear probes, the scoring head and the `linear` head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fit_lbfgs(
    model: nn.Module,
    inputs,
    labels: torch.Tensor,
    l2: float = 1e-3,
    max_iter: int = 100,
    tolerance_grad: float = 1e-6,
    tolerance_change: float = 1e-9,
    history_size: int = 10,
) -> int:
    """Minimise mean cross-entropy + `l2`/2 * sum of squared weights (biases free) of `model(inputs)`,
    full batch, from the model's current parameters; returns the L-BFGS iterations used."""
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=history_size,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), labels)
        loss = loss + 0.5 * l2 * sum(w.pow(2).sum() for w in weights)
        loss.backward()
        return loss

    with torch.inference_mode(False), torch.enable_grad():
        opt.step(closure)
    return int(opt.state[opt._params[0]].get("n_iter", 0))
