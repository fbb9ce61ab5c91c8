"""Loss-curve fits of one run: power law after burn-in, early/full slopes, best validation.

Everything here is pure numpy on arrays (plus a pandas convenience, `fit_run`), so the
same numbers come out whether called from an asset, a notebook or a test.

Definitions (SPEC section 4, made exact; README "Analysis definitions" says the same):

- **Burn-in** ends at the first step whose train CE is <= 1.0 (`knee_epoch` is that step's
  fractional epoch, `burn_in_loss` its loss). A run that never gets there has no burn-in:
  no power-law fit (exponent, intercept and every R² are NaN) and no `alpha_full`.
- **Raw power law** (the plan's rule): log L = log a + b log t by least squares over the
  per-batch train losses of every step t >= the burn-in step. `r_squared` is that
  regression's R².
- **Noise ceiling** of the raw R²: per-batch losses scatter around any smooth trend, so no
  curve can reach R² = 1. With sigma² the variance of that scatter in log L,
  ``ceiling = 1 - sigma² / Var(log L)`` (Var with divisor n, over the fitted points), clipped
  to [0, 1]. sigma² is estimated from second differences of successive log-losses (steps
  are consecutive): ``sigma² = sum((y[i-1] - 2 y[i] + y[i+1])²) / (6 (n - 2))``, unbiased for
  i.i.d. noise around a trend that is locally linear (the trend's share is of order
  f''², negligible for a power law over hundreds of steps).
- **Per-epoch means**: each integer epoch's batches (epoch e holds steps with fractional
  epoch in (e-1, e]) are averaged; the mean is placed at the mean step (and mean fractional
  epoch) of the batches averaged. From burn-in, only batches at or after the burn-in step
  are averaged, so the knee's epoch contributes the mean of its post-burn-in batches only.
- **Epoch-mean power law**: the same log-log least squares over those post-burn-in
  per-epoch means against their mean step (`r_squared_epoch_mean`, `exponent_epoch_mean`).
- **alpha_early**: least-squares slope (nats per epoch) of the per-epoch mean train loss
  over the whole epochs of the profile's window (the plan's 5 to 15 of 50), all batches.
- **alpha_full**: the same slope over the per-epoch means from burn-in to the end, built
  from the batches at or after the burn-in step (the convention above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

NAN = float("nan")
BURN_IN_CE = 1.0  # nats: burn-in ends at the first train CE <= this (SPEC section 4)
PLAN_ALPHA_EARLY = (5, 15)  # epochs of the plan's 50

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


@dataclass(frozen=True)
class EpochMeans:
    """Per-epoch means of a loss curve, one entry per integer epoch that has batches."""

    epoch: np.ndarray  # integer epoch (1 = first)
    mean_epoch: np.ndarray  # mean fractional epoch of the batches averaged
    mean_step: np.ndarray  # mean step of the batches averaged
    loss: np.ndarray  # mean loss
    count: np.ndarray  # batches averaged


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


def noise_variance(y) -> float:
    """Variance of i.i.d. scatter around a smooth trend, from second differences.

    ``sum((y[i-1] - 2 y[i] + y[i+1])²) / (6 (n - 2))`` over a sequence in order
    (equally spaced): each second difference of i.i.d. noise has variance 6 sigma², and a
    locally linear trend cancels. Non-finite values are dropped first; NaN below 3 points.
    """
    y = _as_float(y)
    y = y[np.isfinite(y)]
    if y.size < 3:
        return NAN
    d2 = y[:-2] - 2.0 * y[1:-1] + y[2:]
    return float(d2 @ d2) / (6.0 * (y.size - 2))


def r2_noise_ceiling(y) -> tuple[float, float]:
    """(ceiling, sigma²): the highest R² any smooth curve can reach on the sequence `y`.

    ``ceiling = 1 - sigma² / Var(y)``, Var with divisor n, sigma² from `noise_variance`,
    clipped to [0, 1] (0: the scatter accounts for all the variance). NaNs below 3 points
    or for a constant `y`.
    """
    y = _as_float(y)
    y = y[np.isfinite(y)]
    sigma2 = noise_variance(y)
    var = float(np.var(y)) if y.size else NAN
    if not math.isfinite(sigma2) or not var > 0:
        return NAN, sigma2
    return float(min(1.0, max(0.0, 1.0 - sigma2 / var))), sigma2


def burn_in(epochs, loss, threshold: float = BURN_IN_CE) -> tuple[float, float] | None:
    """First point (in step order) where the loss is <= threshold: (knee_epoch, loss there).

    None when the loss never gets there (e.g. a diverged or far too short run).
    """
    loss = _as_float(loss)
    i = burn_in_index(loss, threshold)
    if i is None:
        return None
    return float(_as_float(epochs)[i]), float(loss[i])


def burn_in_index(loss, threshold: float = BURN_IN_CE) -> int | None:
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


def epoch_means(step, epoch, loss, from_step: float | None = None) -> EpochMeans:
    """Per-epoch means of the batches with a finite loss (and step >= `from_step` if given).

    Each mean sits at the mean step and mean fractional epoch of the batches it averages,
    so a partial epoch (the knee's, from burn-in) is placed where its batches are.
    """
    step, epoch, loss = _as_float(step), _as_float(epoch), _as_float(loss)
    ok = np.isfinite(step) & np.isfinite(epoch) & np.isfinite(loss)
    if from_step is not None:
        ok &= step >= from_step
    if not ok.any():
        empty = np.array([], dtype=float)
        return EpochMeans(empty, empty, empty, empty, np.array([], dtype=int))
    epochs, inverse = np.unique(integer_epoch(epoch[ok]), return_inverse=True)
    counts = np.bincount(inverse)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=values) / counts

    return EpochMeans(epochs, mean(epoch[ok]), mean(step[ok]), mean(loss[ok]), counts)


def alpha_early(epochs, means, start: int = PLAN_ALPHA_EARLY[0], end: int = PLAN_ALPHA_EARLY[1]):
    """Slope of the per-epoch mean train loss over epochs start..end inclusive.

    NaN unless every epoch of that window is present: a run shorter than `end` epochs
    would otherwise report a slope over a different window than the others.
    """
    epochs, means = _as_float(epochs), _as_float(means)
    window = (epochs >= start) & (epochs <= end) & np.isfinite(means)
    if not set(range(start, end + 1)).issubset(set(epochs[window].astype(int).tolist())):
        return NAN
    return linear_slope(epochs[window], means[window])


def alpha_full(step, epoch, loss, burn_in_step: float | None) -> float:
    """Slope (nats per epoch) of the per-epoch mean train loss from burn-in to the end.

    Convention: only the batches at or after `burn_in_step` are averaged, so the knee's
    epoch contributes the mean of its post-burn-in batches, placed at their mean epoch
    (`epoch_means`). Whole epochs sit at a fixed offset from their integer epoch, so for
    them this is the plain slope over integer epochs. NaN without a burn-in.
    """
    if burn_in_step is None or not math.isfinite(burn_in_step):
        return NAN
    means = epoch_means(step, epoch, loss, from_step=burn_in_step)
    return linear_slope(means.mean_epoch, means.loss)


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


FIT_KEYS = (
    "knee_epoch",
    "burn_in_step",
    "burn_in_loss",
    "r_squared",
    "r_squared_ceiling",
    "noise_var",
    "exponent",
    "intercept",
    "n_points",
    "r_squared_epoch_mean",
    "exponent_epoch_mean",
    "intercept_epoch_mean",
    "n_epoch_means",
    "alpha_early",
    "alpha_full",
    "best_val_ce",
    "best_val_epoch",
)


def fit_run(
    batch: pd.DataFrame,
    val: pd.DataFrame,
    max_epoch: float | None = None,
    alpha_early_epochs: tuple[int, int] = PLAN_ALPHA_EARLY,
) -> dict:
    """All per-run fit numbers of SPEC section 4 from one run's batch and val metrics.

    `batch` has columns step (1-based), epoch (fractional) and loss (nats); `val` has
    epoch and val_loss. `max_epoch` cuts both to the analysis horizon (e.g. 50 epochs);
    `alpha_early_epochs` is the profile's early window. Keys are `FIT_KEYS`; missing
    floats are NaN and the counts are ints. Without burn-in there is no power-law fit:
    the fit fields, the ceiling and alpha_full are NaN and the counts 0.
    """
    batch = batch.sort_values("step")
    if max_epoch is not None:
        batch = batch[batch["epoch"] <= max_epoch + _EPOCH_EPS]
        val = val[val["epoch"] <= max_epoch + _EPOCH_EPS]
    step = batch["step"].to_numpy(dtype=float)
    epoch = batch["epoch"].to_numpy(dtype=float)
    loss = batch["loss"].to_numpy(dtype=float)

    all_means = epoch_means(step, epoch, loss)
    out = dict.fromkeys(FIT_KEYS, NAN)
    out.update(n_points=0, n_epoch_means=0)
    out["alpha_early"] = alpha_early(all_means.epoch, all_means.loss, *alpha_early_epochs)
    out["best_val_ce"], out["best_val_epoch"] = best_val(
        val["epoch"].to_numpy(float), val["val_loss"].to_numpy(float)
    )
    i = burn_in_index(loss)
    if i is None:
        return _typed(out)

    out["knee_epoch"], out["burn_in_step"], out["burn_in_loss"] = epoch[i], step[i], loss[i]
    after = step >= step[i]
    raw = fit_power_law(step[after], loss[after])
    usable = after & np.isfinite(loss) & (loss > 0)
    ceiling, sigma2 = r2_noise_ceiling(np.log(loss[usable]))
    out.update(
        r_squared=raw.r_squared,
        r_squared_ceiling=ceiling,
        noise_var=sigma2,
        exponent=raw.exponent,
        intercept=raw.intercept,
        n_points=raw.n,
    )
    means = epoch_means(step, epoch, loss, from_step=step[i])
    smooth = fit_power_law(means.mean_step, means.loss)
    out.update(
        r_squared_epoch_mean=smooth.r_squared,
        exponent_epoch_mean=smooth.exponent,
        intercept_epoch_mean=smooth.intercept,
        n_epoch_means=smooth.n,
        alpha_full=alpha_full(step, epoch, loss, step[i]),
    )
    return _typed(out)


def _typed(out: dict) -> dict:
    return {k: (int(v) if k in ("n_points", "n_epoch_means") else float(v)) for k, v in out.items()}
