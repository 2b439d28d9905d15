"""The table's grid: its methods (`ROWS`), columns and the layers each method reads."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "val", "test")


L2_GRID = (
    1e-1,
    1e-2,
    1e-3,
    1e-4,
    1e-5,
    1e-6,
)  # linear_probe: strongest first (ties keep the stronger)


COLUMNS = [
    "dataset",
    "train_rows",
    "method",
    "group",
    "encoders",
    "layers",
    "test_acc_mean",
    "test_acc_std",
    "test_f1_mean",
    "val_acc_mean",
    "val_f1_mean",
    "seeds",
    "vs",
    "diff",
    "diff_lo",
    "diff_hi",
    "p",
    "p_bound",
    "p_holm",
    "p_holm_bound",
    "verdict",
    "primary",
    "ref_tied",
    "tie_changes",
    "gate",
    "extract_s",
    "extract_peak_mb",
    "train_s",
    "train_peak_mb",
]
"""The table's columns; `test_*`/`val_*`, `seeds` and every significance column come from the per-row
predictions alone (`results/predictions/<dataset>.npz`), so `layerfusion analyze --from-results` recomputes
them; `gate` and the cost columns come from the runs (`paper_runs.csv`)."""

FROM_PREDICTIONS = COLUMNS[COLUMNS.index("test_acc_mean") : COLUMNS.index("gate")]


NOT_IN_CSV = ("reused", "features")


@dataclass(frozen=True)
class Row:
    """One method of the table: which encoders (`*` = each encoder alone, `all` = all together), which
    head, and which layers (`last`, `best`, `top_k`, `cumulative`, `all`)."""

    method: str
    encoders: str
    head: str
    layers: str
    group: str = "main"
    description: str = ""


ROWS = [
    Row("last_layer", "*", "last_layer", "last", description="last layer, one encoder"),
    Row("best_layer", "*", "single_layer", "best", description="best dev-probe layer, one encoder"),
    Row(
        "linear_probe",
        "*",
        "linear",
        "best",
        description="logistic regression on the best dev-probe layer, L2 chosen on dev",
    ),
    Row("selected", "*", "gated", "top_k", description="importance-selected layers, one encoder"),
    Row(
        "concat_last",
        "all",
        "concat",
        "last",
        description="last layers of all encoders, concatenated",
    ),
    Row(
        "gated",
        "all",
        "gated",
        "top_k",
        description="the method: gated fusion over selected layers",
    ),
    Row(
        "single_last",
        "*",
        "gated",
        "last",
        "factorial",
        "the gated head on the last layer, one encoder",
    ),
    Row(
        "single_best",
        "*",
        "gated",
        "best",
        "factorial",
        "the gated head on the best dev-probe layer, one encoder",
    ),
    Row(
        "fused_last",
        "all",
        "gated",
        "last",
        "factorial",
        "the gated head on every encoder's last layer",
    ),
    Row(
        "fused_best",
        "all",
        "gated",
        "best",
        "factorial",
        "the gated head on every encoder's best dev-probe layer",
    ),
    Row(
        "stacking",
        "all",
        "stacking",
        "best",
        "bound",
        "logistic regression on the encoders' linear_probe log-probabilities, cross-fitted on dev folds",
    ),
    Row(
        "no_gate",
        "all",
        "mix_concat",
        "top_k",
        "ablation",
        "gate off: per-encoder layer mix, encoders concatenated",
    ),
    Row("gated_all_layers", "all", "gated", "all", "ablation", "selection off: every layer"),
    Row(
        "gated_cumulative",
        "all",
        "gated",
        "cumulative",
        "ablation",
        "other selection strategy: cumulative score share",
    ),
    Row(
        "gated_encoder_dropout",
        "all",
        "gated_encoder_dropout",
        "top_k",
        "ablation",
        "encoder dropout 0.5: one encoder's branch zeroed per example at random, gate renormalised",
    ),
]


GROUP = {r.method: r.group for r in ROWS}

FACTORIAL = ("single_last", "single_best", "selected", "fused_last", "fused_best", "gated")
"""One head (gated) throughout: {one encoder, every encoder} x {last layer, best dev layer, top-k by
importance}; the rows of the low-data arm."""

PRIMARY = "gated"
"""The declared primary comparison of each family: `gated` against the reference row."""


def _layers(row: Row, encs: list[str], selections: dict, depth: dict[str, int]) -> dict | None:
    if row.layers == "all":
        return {k: list(range(depth[k])) for k in encs}
    if row.layers == "last":
        return {k: [depth[k] - 1] for k in encs}
    return {k: selections[row.layers][k] for k in encs}


def _fmt_layers(layers: dict | None) -> str:
    return " ".join(f"{k}:{','.join(map(str, v))}" for k, v in (layers or {}).items())


def _row_id(row: Row, encs: list[str]) -> str:
    return row.method if row.encoders == "all" else f"{row.method}-{encs[0]}"


def _spec_key(spec: dict) -> str:
    from layerfusion.encoders.frozen import EncoderSpec

    return EncoderSpec(**spec).key


def _is(cb: dict, *names: str) -> bool:
    return isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] in names
