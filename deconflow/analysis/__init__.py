"""Pure analysis library (numpy/scipy/torch): per-run fits, noise spectra, curvature
probes and the hypothesis tables of SPEC section 4. No Dagster, no I/O."""

from deconflow.analysis.curvature import hutchinson_trace, model_hvp, power_iteration
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
from deconflow.analysis.spectra import (
    ewma,
    gradient_variance,
    psd,
    psd_tail_ratio,
    residual_power,
)

__all__ = [
    "PowerLawFit",
    "alpha_early",
    "alpha_full",
    "best_val",
    "burn_in",
    "burn_in_index",
    "correlations",
    "ewma",
    "fit_power_law",
    "fit_run",
    "gradient_variance",
    "h1_power_law_prevalence",
    "h1_table",
    "h2_table",
    "hutchinson_trace",
    "hypotheses_table",
    "integer_epoch",
    "linear_slope",
    "model_hvp",
    "per_epoch_mean",
    "power_iteration",
    "psd",
    "psd_tail_ratio",
    "residual_power",
]
