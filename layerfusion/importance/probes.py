"""Per-layer linear probes, fitted full-batch with L-BFGS (`layerfusion.fusion.lbfgs`)."""

from __future__ import annotations

import torch
from torch import nn

from layerfusion.fusion.lbfgs import fit_lbfgs


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
    probe = zero_linear(train_x.shape[1], num_classes, train_x.device)
    fit_lbfgs(probe, train_x, train_y, l2, max_iter)
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
