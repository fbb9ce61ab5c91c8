"""Loss-curve fits of one run: power law after burn-in, early/full slopes, best validation.

Everything here is pure numpy on arrays (plus a pandas convenience, `fit_run`), so the
same numbers come out whether called from an asset, a notebook or a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

NAN = float("nan")

# Fractional epochs are step / steps_per_epoch; the last batch of an epoch can land a
# rounding error above the integer, which must not push it into the next epoch.
_EPOCH_EPS = 1e-9


@dataclass(frozen=True)
class PowerLawFit:
    """Result of log L = intercept + exponent * log t (natural logs)."""

    exponent: float
    intercept: float
    r_squared: float
    n: int


def _as_float(a) -> np.ndarray:
    return np.asarray(a, dtype=float).ravel()


def fit_power_law(t, loss) -> PowerLawFit:
    """Least-squares fit in log-log space; R² is that of the log-log regression.

    Points with t <= 0, loss <= 0 or non-finite values cannot be logged and are dropped.
    Fewer than 3 usable points (or a constant t) gives NaNs, with `n` still reported.
    """
    t, loss = _as_float(t), _as_float(loss)
    ok = np.isfinite(t) & np.isfinite(loss) & (t > 0) & (loss > 0)
    n = int(ok.sum())
    if n < 3:
        return PowerLawFit(NAN, NAN, NAN, n)
    x, y = np.log(t[ok]), np.log(loss[ok])
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float(xc @ xc)
    if sxx == 0.0:
        return PowerLawFit(NAN, NAN, NAN, n)
    b = float(xc @ yc) / sxx
    a = float(y.mean() - b * x.mean())
    ss_res = float(np.sum((y - (a + b * x)) ** 2))
    ss_tot = float(yc @ yc)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else NAN
    return PowerLawFit(b, a, r2, n)


def burn_in(epochs, loss, threshold: float = 1.0) -> tuple[float, float] | None:
    """First point (in step order) where the loss is <= threshold: (knee_epoch, loss there).

    None when the loss never gets there (e.g. a diverged or far too short run).
    """
    loss = _as_float(loss)
    i = burn_in_index(loss, threshold)
    if i is None:
        return None
    return float(_as_float(epochs)[i]), float(loss[i])


def burn_in_index(loss, threshold: float = 1.0) -> int | None:
    """Index of the first finite loss <= threshold, or None; shared by `burn_in`/`fit_run`."""
    hits = np.flatnonzero(np.isfinite(_as_float(loss)) & (_as_float(loss) <= threshold))
    return int(hits[0]) if hits.size else None


def linear_slope(x, y) -> float:
    """Ordinary least-squares slope of y on x over finite pairs; NaN if it is undefined."""
    x, y = _as_float(x), _as_float(y)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return NAN
    xc = x[ok] - x[ok].mean()
    sxx = float(xc @ xc)
    if sxx == 0.0:
        return NAN
    return float(xc @ (y[ok] - y[ok].mean())) / sxx


def per_epoch_mean(epoch_index, loss) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss of each integer epoch (1 = first epoch), sorted by epoch.

    Non-finite losses are ignored; an epoch with none left is dropped, so a slope over
    the result never silently includes a NaN epoch.
    """
    idx, loss = _as_float(epoch_index), _as_float(loss)
    ok = np.isfinite(idx) & np.isfinite(loss)
    if not ok.any():
        return np.array([], dtype=float), np.array([], dtype=float)
    epochs, inverse = np.unique(idx[ok], return_inverse=True)
    sums = np.bincount(inverse, weights=loss[ok])
    counts = np.bincount(inverse)
    return epochs, sums / counts


def alpha_early(epochs, means, start: int = 5, end: int = 15) -> float:
    """Slope of the per-epoch mean train loss over epochs start..end inclusive.

    NaN unless every epoch of that window is present: a run shorter than `end` epochs
    would otherwise report a slope over a different window than the others.
    """
    epochs, means = _as_float(epochs), _as_float(means)
    window = (epochs >= start) & (epochs <= end) & np.isfinite(means)
    if not set(range(start, end + 1)).issubset(set(epochs[window].astype(int).tolist())):
        return NAN
    return linear_slope(epochs[window], means[window])


def alpha_full(epochs, means, knee_epoch: float | None) -> float:
    """Slope of the per-epoch mean train loss from burn-in (epochs >= knee_epoch) to the end."""
    if knee_epoch is None or not math.isfinite(knee_epoch):
        return NAN
    epochs, means = _as_float(epochs), _as_float(means)
    sel = epochs >= knee_epoch
    return linear_slope(epochs[sel], means[sel])


def best_val(epochs, val_loss) -> tuple[float, float]:
    """(lowest finite validation loss, epoch where it first occurs); NaNs if there is none."""
    epochs, val_loss = _as_float(epochs), _as_float(val_loss)
    ok = np.flatnonzero(np.isfinite(val_loss) & np.isfinite(epochs))
    if ok.size == 0:
        return NAN, NAN
    i = int(ok[np.argmin(val_loss[ok])])
    return float(val_loss[i]), float(epochs[i])


def integer_epoch(epoch) -> np.ndarray:
    """Integer epoch of fractional epochs: epoch 1 holds 0 < e <= 1 (ceil, rounding-safe)."""
    return np.ceil(_as_float(epoch) - _EPOCH_EPS)


def fit_run(batch: pd.DataFrame, val: pd.DataFrame, max_epoch: float | None = None) -> dict:
    """All per-run fit numbers of SPEC section 4 from one run's batch and val metrics.

    `batch` has columns step (1-based), epoch (fractional) and loss (nats); `val` has
    epoch and val_loss. `max_epoch` cuts both to the analysis horizon (e.g. 50 epochs).
    The power law is fitted on loss vs step from the burn-in step on; with no burn-in it
    is fitted on all points and the knee fields are NaN. Missing floats are NaN.
    """
    batch = batch.sort_values("step")
    if max_epoch is not None:
        batch = batch[batch["epoch"] <= max_epoch + _EPOCH_EPS]
        val = val[val["epoch"] <= max_epoch + _EPOCH_EPS]
    step = batch["step"].to_numpy(dtype=float)
    epoch = batch["epoch"].to_numpy(dtype=float)
    loss = batch["loss"].to_numpy(dtype=float)

    i = burn_in_index(loss)
    if i is None:
        knee_epoch, burn_in_loss = NAN, NAN
        after = np.ones_like(step, dtype=bool)
    else:
        knee_epoch, burn_in_loss = float(epoch[i]), float(loss[i])
        after = step >= step[i]
    fit = fit_power_law(step[after], loss[after])

    epochs, means = per_epoch_mean(integer_epoch(epoch), loss)
    best_ce, best_epoch = best_val(val["epoch"].to_numpy(float), val["val_loss"].to_numpy(float))
    return {
        "r_squared": fit.r_squared,
        "exponent": fit.exponent,
        "intercept": fit.intercept,
        "knee_epoch": knee_epoch,
        "burn_in_loss": burn_in_loss,
        "alpha_early": alpha_early(epochs, means),
        "alpha_full": alpha_full(epochs, means, knee_epoch),
        "best_val_ce": best_ce,
        "best_val_epoch": best_epoch,
        "n_points": fit.n,
    }
