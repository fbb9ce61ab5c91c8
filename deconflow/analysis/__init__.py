"""Pure analysis library (numpy/scipy/torch): per-run fits, noise spectra, curvature
probes and the hypothesis tables of SPEC section 4. No Dagster, no I/O.

Names are imported lazily, so code that needs only the fits (the asset graph, a run
process waiting on SLURM) does not pay for importing torch.
"""

from importlib import import_module

_WHERE = {
    "PowerLawFit": "fits",
    "alpha_early": "fits",
    "alpha_full": "fits",
    "best_val": "fits",
    "burn_in": "fits",
    "burn_in_index": "fits",
    "correlations": "hypotheses",
    "ewma": "spectra",
    "fit_power_law": "fits",
    "fit_run": "fits",
    "gradient_variance": "spectra",
    "h1_power_law_prevalence": "hypotheses",
    "h1_table": "hypotheses",
    "h2_table": "hypotheses",
    "hutchinson_trace": "curvature",
    "hypotheses_table": "hypotheses",
    "integer_epoch": "fits",
    "linear_slope": "fits",
    "model_hvp": "curvature",
    "per_epoch_mean": "fits",
    "power_iteration": "curvature",
    "psd": "spectra",
    "psd_tail_ratio": "spectra",
    "residual_power": "spectra",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"deconflow.analysis.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'deconflow.analysis' has no attribute {name!r}")
