"""Gradient magnitude of the loss with respect to each layer's pooled embedding, under a head over all layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from layerfusion.fusion.lbfgs import fit_lbfgs


class AllLayersLinear(nn.Module):
    """A linear classifier over every layer of every encoder: `sum_e flatten(x_e) @ W_e + b` (the scoring head)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], num_classes: int, device="cpu") -> None:
        super().__init__()
        self.weight = nn.ParameterDict(
            {
                _safe(e): nn.Parameter(torch.zeros(num_classes, layers * dim, device=device))
                for e, (layers, dim) in shapes.items()
            }
        )
        self.bias = nn.Parameter(torch.zeros(num_classes, device=device))
        self.encoders = list(shapes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.bias
        for e in self.encoders:
            logits = logits + features[e].flatten(1) @ self.weight[_safe(e)].T
        return logits


def fit_scoring_head(
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> AllLayersLinear:
    """Fit `AllLayersLinear` on `features {encoder: [N, L, d]}` (already standardised) with L-BFGS."""
    shapes = {e: (x.shape[1], x.shape[2]) for e, x in features.items()}
    device = next(iter(features.values())).device
    head = AllLayersLinear(shapes, num_classes, device)
    fit_lbfgs(head, features, labels, l2, max_iter)
    return head.requires_grad_(False)


def grad_norm_sums(
    head: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Per encoder, `[L]`: the sum over `rows` of `||d loss_i / d x_i[layer]||_2`.

    The loss is summed over the batch, so row i's gradient is the gradient of its own loss (the head must
    treat rows independently: no batch norm, eval mode). Features enter as leaf tensors with requires_grad.
    """
    sums = {
        e: torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for e, x in features.items()
    }
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            leaves = {
                e: x[batch].detach().clone().requires_grad_(True) for e, x in features.items()
            }
            loss = F.cross_entropy(head(leaves), labels[batch], reduction="sum")
            grads = torch.autograd.grad(loss, list(leaves.values()))
            for e, g in zip(leaves, grads):
                sums[e] += g.norm(dim=-1).sum(0).double()
    return sums


def _safe(name: str) -> str:
    return name.replace(".", "_")
