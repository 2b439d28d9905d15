"""Linear models fitted full-batch with L-BFGS: per-layer probes and the all-layers scoring head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    dev_x: torch.Tensor,
    dev_y: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> float:
    """Dev accuracy of a linear probe fitted on `train_x [N, d]` alone (features z-scored with train statistics)."""
    train_x, dev_x = standardise(train_x, dev_x)
    probe = fit_lbfgs(
        zero_linear(train_x.shape[1], num_classes, train_x.device), train_x, train_y, l2, max_iter
    )
    with torch.no_grad():
        return (probe(dev_x).argmax(-1) == dev_y).float().mean().item()


def standardise(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Z-score every feature (all dims but the first) with the train rows' mean and std (std floored at 1e-6)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return tuple((x - mean) / std for x in (train, *others))


def zero_linear(width: int, num_classes: int, device: torch.device | str = "cpu") -> nn.Linear:
    """A zero-initialised linear layer (the fit is convex: no seed needed, same result every run)."""
    linear = nn.Linear(width, num_classes, device=device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def fit_lbfgs(
    model: nn.Module, inputs, labels: torch.Tensor, l2: float = 1e-3, max_iter: int = 100
) -> nn.Module:
    """Minimise mean cross-entropy + `l2`/2 * sum of squared weights (biases free) of `model(inputs)`, full batch."""
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
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
    model.requires_grad_(False)
    return model
