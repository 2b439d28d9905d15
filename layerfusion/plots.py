"""PNG figures for a run: layer-importance heatmap, confusion matrix, gate weights, results bars, CKA."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def importance_heatmap(rows: list[dict], path: str | Path, value: str = "score") -> Path:
    """Encoder x layer heatmap of `value` from importance rows; selected layers are boxed."""
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    depth = max(int(r["layer"]) for r in rows) + 1
    grid = np.full((len(encoders), depth), np.nan)
    for r in rows:
        v = r.get(value)
        grid[encoders.index(r["encoder"]), int(r["layer"])] = (
            np.nan if v in (None, "") else float(v)
        )
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * depth + 2), 0.8 * len(encoders) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
    for r in rows:
        if str(r.get("selected")).lower() in ("true", "1"):
            y, x = encoders.index(r["encoder"]), int(r["layer"])
            ax.add_patch(
                plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
            )
    ax.set_xticks(range(depth))
    ax.set_yticks(range(len(encoders)), encoders)
    ax.set_xlabel("layer (0 = embeddings); red box = selected")
    ax.set_title(f"layer importance: {value}")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def matrix_heatmap(
    matrix: np.ndarray,
    labels: list[str],
    path: str | Path,
    title: str,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """A square labelled heatmap (e.g. CKA between layers)."""
    size = max(5, 0.3 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(np.asarray(matrix, dtype=float), cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def confusion_matrix(
    matrix: np.ndarray, labels: list[str], path: str | Path, title: str = "confusion matrix"
) -> Path:
    """Row-normalised confusion matrix (rows = gold), with counts in the cells."""
    counts = np.asarray(matrix, dtype=float)
    norm = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    size = max(4, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(
                    j,
                    i,
                    int(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ticks = range(len(labels)) if len(labels) <= 60 else []
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90)
    ax.set_yticks(ticks, [labels[i] for i in ticks])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def bars(
    names: list[str],
    values: list[float],
    path: str | Path,
    ylabel: str,
    title: str,
    errors: list[float] | None = None,
) -> Path:
    """A labelled bar chart (values annotated)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 4))
    ax.bar(range(len(names)), values, yerr=errors, color="tab:blue", capsize=3)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    lo = min(values) if values else 0
    ax.set_ylim(
        max(0, lo - 0.1 * (max(values) - lo + 1e-9) - 0.02) if ylabel.endswith("accuracy") else 0,
        None,
    )
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
