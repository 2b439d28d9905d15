"""REFERENCE WORKFLOW, for comparison only: a re-implementation of how the paper's public code
obtains per-layer features and probes them (Gwak & Jung 2025, arXiv 2504.05764).

It is not layerfusion code and is not used by layerfusion. For each model and for each layer it
runs one full extraction over the data with `output_hidden_states=True` (unsorted batches of 32,
padded to the batch maximum), masked-mean pools that one layer, `torch.save`s the tensor, loads it
back and trains a plain PyTorch MLP probe on it. `train_probe` is also used, unchanged, by the
layerfusion side of the benchmark, so both sides train exactly the same probes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def reference_pipeline(
    models: dict[str, tuple[nn.Module, object]],
    texts: list[str],
    labels: list[int],
    workdir: Path,
    batch_size: int = 32,
    max_length: int = 128,
    probe_epochs: int = 5,
) -> dict[str, list[float]]:
    """Per model, per layer: extract, pool, save, load, probe. Returns probe accuracy per layer."""
    y = torch.tensor(labels)
    accuracies: dict[str, list[float]] = {}
    for name, (model, tokenizer) in models.items():
        model.eval()
        accuracies[name] = []
        for layer in range(model.config.num_hidden_layers + 1):
            features = extract_layer(model, tokenizer, texts, layer, batch_size, max_length)
            path = layer_file(workdir, name, layer)
            torch.save(features, path)
            features = torch.load(path)
            accuracies[name].append(train_probe(features, y, probe_epochs))
    return accuracies


def extract_layer(
    model: nn.Module, tokenizer, texts: list[str], layer: int, batch_size: int, max_length: int
) -> torch.Tensor:
    """One full pass over `texts` keeping only hidden state `layer`, masked-mean pooled: `[N, d]`."""
    device = next(model.parameters()).device
    pooled = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            )
            hidden = out.hidden_states[layer]
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu())
    return torch.cat(pooled)


def layer_file(workdir: Path, model: str, layer: int) -> Path:
    """Where the reference saves the features of one (model, layer)."""
    return Path(workdir) / f"{model}_layer{layer}.pt"


def train_probe(
    x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0, hidden: int = 256
) -> float:
    """Train an MLP probe on a seeded 80% of `(x, y)` for `epochs` epochs; its accuracy on the other 20%."""
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    cut = int(0.8 * len(x))
    train, held = perm[:cut], perm[cut:]
    torch.manual_seed(seed)
    probe = nn.Sequential(
        nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, int(y.max()) + 1)
    )
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    for _ in range(epochs):
        for rows in train[torch.randperm(cut, generator=g)].split(32):
            loss = F.cross_entropy(probe(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (probe(x[held]).argmax(1) == y[held]).float().mean().item()
