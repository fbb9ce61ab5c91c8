"""Pure analysis library (numpy/scipy/pandas): per-run fits and the hypothesis tables of
SPEC section 4. No Dagster, no torch, no I/O: the assets and the warehouse call it."""

from deconflow.analysis.fits import (
    PowerLawFit,
    alpha_early,
    alpha_full,
    best_val,
    burn_in,
    burn_in_index,
    fit_power_law,
    fit_run,
    integer_epoch,
    linear_slope,
    per_epoch_mean,
)
from deconflow.analysis.hypotheses import (
    correlations,
    h1_power_law_prevalence,
    h1_table,
    h2_table,
    hypotheses_table,
)

__all__ = [
    "PowerLawFit",
    "alpha_early",
    "alpha_full",
    "best_val",
    "burn_in",
    "burn_in_index",
    "correlations",
    "fit_power_law",
    "fit_run",
    "h1_power_law_prevalence",
    "h1_table",
    "h2_table",
    "hypotheses_table",
    "integer_epoch",
    "linear_slope",
    "per_epoch_mean",
]
