"""Layer importance (gradient magnitude, attention entropy, probe accuracy), the combined score, layer selection.

Pure functions on tensors and tables; the callbacks `LayerImportance` and `LayerSelection` drive them.
"""

from layerfusion.importance.attention import (
    attention_entropy,
    eager_attention,
    encoder_attention_entropy,
)
from layerfusion.importance.gradients import AllLayersLinear, fit_scoring_head, grad_norm_sums
from layerfusion.importance.probes import fit_lbfgs, probe_accuracy, standardise
from layerfusion.importance.scores import (
    COLUMNS,
    COMPONENTS,
    DEFAULT_WEIGHTS,
    LayerScore,
    check_weights,
    combine,
    mark_selected,
    minmax,
    read_table,
    scores_by_encoder,
    write_table,
)
from layerfusion.importance.selection import ranked, select_cumulative, select_fixed, select_top_k

__all__ = [
    "COLUMNS",
    "COMPONENTS",
    "DEFAULT_WEIGHTS",
    "AllLayersLinear",
    "LayerScore",
    "attention_entropy",
    "check_weights",
    "combine",
    "eager_attention",
    "encoder_attention_entropy",
    "fit_lbfgs",
    "fit_scoring_head",
    "grad_norm_sums",
    "mark_selected",
    "minmax",
    "probe_accuracy",
    "ranked",
    "read_table",
    "scores_by_encoder",
    "select_cumulative",
    "select_fixed",
    "select_top_k",
    "standardise",
    "write_table",
]
