"""Pure analysis library (numpy/scipy/pandas): per-run fits and the hypothesis tables of
SPEC section 4. No Dagster, no torch, no I/O: the assets and the warehouse call it.

The names below load their module on first use (PEP 562): a training process needs only
``fits``, and ``hypotheses`` imports scipy.stats (about 0.5 s)."""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    **dict.fromkeys(
        (
            "BURN_IN_CE",
            "FIT_KEYS",
            "MIN_ALPHA_FULL_POINTS",
            "PLAN_ALPHA_EARLY",
            "SMOOTH_EPOCHS",
            "EpochMeans",
            "PowerLawFit",
            "alpha_early",
            "alpha_early_epochs",
            "alpha_full",
            "best_val",
            "burn_in",
            "burn_in_index",
            "epoch_means",
            "fit_arrays",
            "fit_power_law",
            "fit_run",
            "integer_epoch",
            "linear_slope",
            "noise_variance",
            "per_epoch_mean",
            "r2_noise_limited",
            "smoothed",
            "smoothing_window",
        ),
        "fits",
    ),
    **dict.fromkeys(
        (
            "DEFAULT_H1_RULE",
            "H1_RULES",
            "MIN_N",
            "correlations",
            "h1_power_law_prevalence",
            "h1_table",
            "h2_table",
            "hypotheses_table",
            "stratified_correlation",
            "verdict",
            "verdict_table",
            "wilson_interval",
        ),
        "hypotheses",
    ),
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = sorted(_MODULE_OF)
