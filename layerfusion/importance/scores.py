"""The importance table: one row per (encoder, layer), the combined score, CSV/JSON output.

Combined score, per encoder e and layer l:

    n_c(l)   = (v_c(l) - min_e v_c) / (max_e v_c - min_e v_c)   min-max over e's layers where v_c is defined
                                                                (0.5 for every layer when all are equal up to
                                                                a relative TIE_RTOL = 1e-5)
    t_c(l)   = n_c(l) if w_c >= 0 else 1 - n_c(l)               a negative weight prefers low values
    score(l) = sum_c |w_c| t_c(l) / sum_c |w_c|                 over the components c defined at l

so every score lies in [0, 1] and encoders of different width and depth compare. Layer 0 (the embedding
output) has no attention: its `attention_entropy` is NaN and its score is the weighted mean of the other
components (the entropy weight drops out of numerator and denominator).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from layerfusion.errors import ConfigError

COMPONENTS = ("grad_norm", "attention_entropy", "probe_acc")
# probe accuracy is the direct measure (the paper ranks layers by per-layer classification accuracy);
# gradient magnitude says how much a head over all layers leans on the layer; attention entropy enters
# with a negative weight (sharper attention scores higher): over layers 1..L its Spearman correlation with
# dev probe accuracy was -0.32 (SST-2) and -0.57 (R8) for all-mpnet-base-v2, about 0 for all-MiniLM-L6-v2
# (results/importance/README.md).
DEFAULT_WEIGHTS = {"probe_acc": 1.0, "grad_norm": 0.5, "attention_entropy": -0.25}


@dataclass
class LayerScore:
    """One row of the importance table."""

    encoder: str
    layer: int
    grad_norm: float = math.nan
    """Mean L2 norm of d(loss)/d(standardised pooled embedding) under a linear head over all layers."""
    attention_entropy: float = math.nan
    """Mean entropy (nats) of the layer's heads over valid keys, per valid query token; NaN for layer 0."""
    probe_acc: float = math.nan
    """Dev accuracy of a linear probe on this layer alone."""
    score: float = math.nan
    """Combined score in [0, 1] (see the module docstring)."""
    selected: bool = False
    """Whether the head trained on this layer."""


COLUMNS = [f.name for f in fields(LayerScore)]


def check_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """`DEFAULT_WEIGHTS` updated with `weights`; unknown components or all-zero weights are errors."""
    merged = dict(DEFAULT_WEIGHTS)
    for name, value in (weights or {}).items():
        if name not in COMPONENTS:
            raise ConfigError(
                f"unknown importance component {name!r} in weights; known: {', '.join(COMPONENTS)}"
            )
        if not math.isfinite(float(value)):
            raise ConfigError(f"importance weight {name!r} must be a finite number, got {value!r}")
        merged[name] = float(value)
    if not any(merged.values()):
        raise ConfigError(
            f"importance weights are all zero ({merged}); give at least one non-zero weight"
        )
    return merged


def combine(rows: list[LayerScore], weights: dict[str, float]) -> list[LayerScore]:
    """Set `score` on every row (normalised per encoder, see the module docstring) and return the rows."""
    for encoder in dict.fromkeys(r.encoder for r in rows):
        own = [r for r in rows if r.encoder == encoder]
        normalised = {c: minmax([getattr(r, c) for r in own]) for c in COMPONENTS}
        for i, row in enumerate(own):
            num = den = 0.0
            for c in COMPONENTS:
                w, n = weights.get(c, 0.0), normalised[c][i]
                if w == 0 or math.isnan(n):
                    continue
                num += abs(w) * (n if w > 0 else 1.0 - n)
                den += abs(w)
            row.score = num / den if den else math.nan
        if all(math.isnan(r.score) for r in own):
            on = [c for c in COMPONENTS if weights.get(c, 0.0)]
            raise ConfigError(
                f"importance: no layer of encoder {encoder!r} could be scored: every component with a "
                f"non-zero weight ({', '.join(on)}) is missing (NaN) for it; give a measured component a weight"
            )
    return rows


TIE_RTOL = 1e-5
"""Values whose whole range is within this share of their magnitude are ties (float noise, not signal)."""


def minmax(values: list[float]) -> list[float]:
    """Min-max scale to [0, 1], NaN kept; values equal up to `TIE_RTOL` (relative) all map to 0.5.

    Without the tolerance, summation-order noise (a DDP run against a single process) would be stretched
    to the full [0, 1] range and could flip the ranking of near-tied layers.
    """
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return [math.nan] * len(values)
    lo, hi = min(finite), max(finite)
    tie = hi - lo <= TIE_RTOL * max(abs(lo), abs(hi))
    return [v if math.isnan(v) else (0.5 if tie else (v - lo) / (hi - lo)) for v in values]


def scores_by_encoder(rows: list[LayerScore]) -> dict[str, dict[int, float]]:
    """`{encoder: {layer: score}}` from table rows."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r.encoder, {})[r.layer] = r.score
    return out


def mark_selected(rows: list[LayerScore], selection: dict[str, list[int]]) -> None:
    """Set `selected` on every row from a selection `{encoder: [layers]}`."""
    for r in rows:
        r.selected = r.layer in selection.get(r.encoder, ())


def write_table(
    rows: list[LayerScore],
    directory: str | Path,
    stem: str = "importance",
    meta: dict | None = None,
) -> tuple[Path, Path]:
    """Write `<stem>.csv` (one row per layer, empty cell = NaN) and `<stem>.json` (`meta` + rows, NaN = null)."""
    from layerfusion.files import write_text

    directory = Path(directory)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(v) for k, v in asdict(r).items()})
    payload = {**(meta or {}), "columns": COLUMNS, "rows": [jsonable(asdict(r)) for r in rows]}
    text = json.dumps(payload, indent=1) + "\n"  # fails (if it does) before anything is written
    # atomic, like the other run files: a killed run leaves the previous table or none, never half of one
    csv_path = write_text(directory / f"{stem}.csv", buf.getvalue())
    json_path = write_text(directory / f"{stem}.json", text)
    return csv_path, json_path


def read_table(path: str | Path) -> list[LayerScore]:
    """Rows of an importance CSV or JSON file written by `write_table`."""
    path = Path(path)
    if path.suffix == ".json":
        raw = json.loads(path.read_text(encoding="utf-8"))["rows"]
    else:
        with open(path, newline="", encoding="utf-8") as fh:
            raw = list(csv.DictReader(fh))
    return [row_from_dict(r) for r in raw]


def row_from_dict(raw: dict) -> LayerScore:
    """A `LayerScore` from a CSV or JSON row (empty / null = NaN)."""

    def num(v) -> float:
        return math.nan if v in (None, "") else float(v)

    return LayerScore(
        encoder=raw["encoder"],
        layer=int(raw["layer"]),
        grad_norm=num(raw["grad_norm"]),
        attention_entropy=num(raw["attention_entropy"]),
        probe_acc=num(raw["probe_acc"]),
        score=num(raw["score"]),
        selected=raw["selected"] in (True, "True", "true", "1"),
    )


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def jsonable(row: dict) -> dict:
    """A row dict with NaN as None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
