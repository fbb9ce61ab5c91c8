"""Loss-curve fits of one run: power law after burn-in, early/full slopes, best validation.

Everything here is pure numpy on arrays (plus a pandas convenience, `fit_run`), so the
same numbers come out whether called from an asset, a notebook or a test. docs/science.md
states the same definitions for readers of the tables.

- **Usable losses**: a batch whose loss is non-finite or <= 0 cannot be logged; it is
  dropped and counted (`n_dropped_nonfinite`), never silently.
- **Burn-in** ends at the first step where the *smoothed* train CE is <= 1.0. Smoother: a
  centred moving mean over one epoch of batches (the odd window nearest the run's batches
  per epoch, shrunk at the ends), so a single lucky batch does not end burn-in.
  `knee_epoch` is that step's fractional epoch, `burn_in_loss` the smoothed loss there.
  A run that never gets there has no burn-in: no power-law fit and no `alpha_full`.
- **Raw power law** (the plan's rule): log L = log a + b log t by least squares over the
  per-batch train losses of every step t >= the burn-in step. `r_squared` is its R².
- **Noise-limited R²** (`r_squared_noise_limited`): an *estimate* of the R² that the true
  smooth trend itself would reach under the batch-to-batch scatter,
  ``1 - sigma² / Var(log L)`` (Var with divisor n over the fitted points), clipped at 0.
  sigma² comes from second differences of log-losses at consecutive steps only
  (``sum(d2²) / (6 m)`` over the m complete triples), unbiased for i.i.d. scatter around a
  locally linear trend. It is not a bound: a run's R² can exceed it by sampling error.
- **Shape R²** (`r_squared_shape` = r_squared / r_squared_noise_limited): algebraically the
  power law's R² against the noise-free trend, ``1 - (MSE_fit - sigma²) / (Var - sigma²)``.
  Near 1 when the power law has the trend's shape whatever the batch noise; H1 counts it.
- **Per-epoch means**: each integer epoch's batches (epoch e holds steps with fractional
  epoch in (e-1, e]) are averaged, placed at their mean step and mean fractional epoch.
- **alpha_early**: least-squares slope (nats per epoch) of the per-epoch mean train loss
  over the plan's `calculate_slope(5, 15)`: 0-based epochs 5..15 end-exclusive, i.e. the
  epochs 6..15 counted from 1, right after the 5-epoch warm-up. A profile's window
  ``(start, end)`` is read the same way (epochs start+1..end counted from 1).
- **alpha_full**: the same slope over the per-epoch means from burn-in to the end (only
  batches at or after the burn-in step). Needs `MIN_ALPHA_FULL_POINTS` epoch means;
  with fewer it is withheld (NaN) and `alpha_full_few_points` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

NAN = float("nan")
BURN_IN_CE = 1.0  # nats: burn-in ends at the first smoothed train CE <= this (SPEC sec. 4)
PLAN_ALPHA_EARLY = (5, 15)  # the plan's calculate_slope(5, 15): 0-based, end-exclusive
SMOOTH_EPOCHS = 1.0  # knee smoother: centred moving mean over this many epochs of batches
MIN_ALPHA_FULL_POINTS = 5  # per-epoch means needed before alpha_full is reported

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


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of products without BLAS: multithreaded BLAS stalls on these small vectors when
    the cores are shared (26 ms instead of 0.1 ms per call under load)."""
    return float(np.multiply(a, b).sum())


def _loglog(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    """OLS of y on x (already logged, all finite): the shared core of the power-law fits."""
    n = int(x.size)
    if n < 3:
        return PowerLawFit(NAN, NAN, NAN, n)
    xm, ym = x.mean(), y.mean()
    xc, yc = x - xm, y - ym
    sxx = _dot(xc, xc)
    if sxx == 0.0:
        return PowerLawFit(NAN, NAN, NAN, n)
    b = _dot(xc, yc) / sxx
    ss_tot = _dot(yc, yc)
    resid = yc - b * xc
    ss_res = _dot(resid, resid)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else NAN
    return PowerLawFit(b, float(ym - b * xm), r2, n)


def fit_power_law(t, loss) -> PowerLawFit:
    """Least-squares fit in log-log space; R² is that of the log-log regression.

    Points with t <= 0, loss <= 0 or non-finite values cannot be logged and are dropped.
    Fewer than 3 usable points (or a constant t) gives NaNs, with `n` still reported.
    """
    t, loss = _as_float(t), _as_float(loss)
    ok = np.isfinite(t) & np.isfinite(loss) & (t > 0) & (loss > 0)
    return _loglog(np.log(t[ok]), np.log(loss[ok]))


def noise_variance(y, step=None) -> float:
    """Variance of i.i.d. scatter around a smooth trend, from second differences.

    ``sum((y[i-1] - 2 y[i] + y[i+1])²) / (6 m)`` over the m triples of consecutive points:
    each second difference of i.i.d. noise has variance 6 sigma², and a locally linear
    trend cancels. With `step`, only triples at consecutive steps count, so a dropped
    (non-finite) batch never makes a difference across a gap. NaN without a triple.
    """
    y = _as_float(y)
    ok = np.isfinite(y)
    if step is None:
        y = y[ok]
        if y.size < 3:
            return NAN
        d2 = y[:-2] - 2.0 * y[1:-1] + y[2:]
        return _dot(d2, d2) / (6.0 * d2.size)
    step = _as_float(step)
    if y.size < 3:
        return NAN
    d2 = y[:-2] - 2.0 * y[1:-1] + y[2:]
    good = ok[:-2] & ok[1:-1] & ok[2:] & (np.diff(step)[:-1] == 1.0) & (np.diff(step)[1:] == 1.0)
    if not good.any():
        return NAN
    d2 = d2[good]
    return _dot(d2, d2) / (6.0 * d2.size)


def r2_noise_limited(y, step=None) -> tuple[float, float]:
    """(noise-limited R² estimate, sigma²) of the sequence `y` (log-losses).

    ``1 - sigma² / Var(y)``, Var with divisor n, sigma² from `noise_variance`, clipped at
    0 (the scatter accounts for all the variance). An estimate of the R² the noise-free
    trend would reach, not a bound. NaNs without 3 finite points or for a constant `y`.
    """
    y = _as_float(y)
    sigma2 = noise_variance(y, step)
    finite = y[np.isfinite(y)]
    var = float(np.var(finite)) if finite.size else NAN
    if not math.isfinite(sigma2) or not var > 0:
        return NAN, sigma2
    return float(max(0.0, 1.0 - sigma2 / var)), sigma2


def smoothed(loss, window: int) -> np.ndarray:
    """Centred moving mean of `loss` over `window` points (odd), shrunk at both ends.

    The knee's smoother: a single batch is too noisy to date the end of burn-in.
    """
    loss = _as_float(loss)
    n = loss.size
    if n == 0 or window <= 1:
        return loss.copy()
    h = window // 2
    c = np.concatenate(([0.0], np.cumsum(loss)))
    i = np.arange(n)
    lo, hi = np.maximum(i - h, 0), np.minimum(i + h + 1, n)
    return (c[hi] - c[lo]) / (hi - lo)


def smoothing_window(epoch) -> int:
    """Odd number of batches nearest `SMOOTH_EPOCHS` epochs of this run (from its epochs)."""
    epoch = _as_float(epoch)
    epoch = epoch[np.isfinite(epoch)]
    if epoch.size < 2 or not epoch[-1] > epoch[0]:
        return 1
    per_epoch = (epoch.size - 1) / (epoch[-1] - epoch[0])
    w = max(1, int(round(SMOOTH_EPOCHS * per_epoch)))
    return w if w % 2 else w + 1


def burn_in(epochs, loss, threshold: float = BURN_IN_CE) -> tuple[float, float] | None:
    """First point (in step order) where the smoothed loss is <= threshold:
    (knee_epoch, smoothed loss there). None when it never gets there."""
    epochs, loss = _as_float(epochs), _as_float(loss)
    ok = np.isfinite(loss) & np.isfinite(epochs)
    sm = smoothed(loss[ok], smoothing_window(epochs[ok]))
    hits = np.flatnonzero(sm <= threshold)
    if not hits.size:
        return None
    return float(epochs[ok][hits[0]]), float(sm[hits[0]])


def burn_in_index(loss, threshold: float = BURN_IN_CE, window: int = 1) -> int | None:
    """Index of the first finite loss whose `window`-point centred mean is <= threshold.

    `window` 1 (the default) is the single-batch crossing; `fit_run` passes one epoch.
    """
    loss = _as_float(loss)
    ok = np.flatnonzero(np.isfinite(loss))
    hits = np.flatnonzero(smoothed(loss[ok], window) <= threshold)
    return int(ok[hits[0]]) if hits.size else None


def linear_slope(x, y) -> float:
    """Ordinary least-squares slope of y on x over finite pairs; NaN if it is undefined."""
    x, y = _as_float(x), _as_float(y)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return NAN
    xc = x[ok] - x[ok].mean()
    sxx = _dot(xc, xc)
    if sxx == 0.0:
        return NAN
    return _dot(xc, y[ok] - y[ok].mean()) / sxx


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


def alpha_early_epochs(start: int, end: int) -> tuple[int, int]:
    """The plan's (start, end), 0-based and end-exclusive, as 1-based inclusive epochs.

    ``calculate_slope(5, 15)`` covers 0-based epochs 5..14: epochs 6..15 counted from 1,
    the ten right after the 5-epoch warm-up. At least two epochs, so a slope exists.
    """
    first = int(start) + 1
    return first, max(int(end), first + 1)


def alpha_early(epochs, means, start: int = PLAN_ALPHA_EARLY[0], end: int = PLAN_ALPHA_EARLY[1]):
    """Slope of the per-epoch mean train loss over the plan's window (start, end).

    `epochs` count from 1; (start, end) is in the plan's 0-based end-exclusive notation
    (`alpha_early_epochs`), so the last warm-up epoch never enters. NaN unless every
    epoch of the window is present: a short run would otherwise use a different window.
    """
    first, last = alpha_early_epochs(start, end)
    epochs, means = _as_float(epochs), _as_float(means)
    window = (epochs >= first) & (epochs <= last) & np.isfinite(means)
    if np.unique(epochs[window]).size != last - first + 1:
        return NAN
    return linear_slope(epochs[window], means[window])


def alpha_full(step, epoch, loss, burn_in_step: float | None) -> float:
    """Slope (nats per epoch) of the per-epoch mean train loss from burn-in to the end.

    Only the batches at or after `burn_in_step` are averaged, so the knee's epoch
    contributes the mean of its post-burn-in batches, placed at their mean epoch. NaN
    without a burn-in or with fewer than `MIN_ALPHA_FULL_POINTS` epoch means.
    """
    if burn_in_step is None or not math.isfinite(burn_in_step):
        return NAN
    means = epoch_means(step, epoch, loss, from_step=burn_in_step)
    if means.loss.size < MIN_ALPHA_FULL_POINTS:
        return NAN
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
    "r_squared_noise_limited",
    "r_squared_shape",
    "noise_var",
    "exponent",
    "intercept",
    "n_points",
    "n_dropped_nonfinite",
    "r_squared_epoch_mean",
    "exponent_epoch_mean",
    "intercept_epoch_mean",
    "n_epoch_means",
    "alpha_early",
    "alpha_full",
    "alpha_full_few_points",
    "best_val_ce",
    "best_val_epoch",
)
_INT_KEYS = ("n_points", "n_epoch_means", "n_dropped_nonfinite")


def fit_run(
    batch: pd.DataFrame,
    val: pd.DataFrame,
    max_epoch: float | None = None,
    alpha_early_epochs: tuple[int, int] = PLAN_ALPHA_EARLY,
) -> dict:
    """All per-run fit numbers of SPEC section 4 from one run's batch and val metrics.

    `batch` has columns step (1-based), epoch (fractional) and loss (nats); `val` has
    epoch and val_loss. `max_epoch` cuts both to the analysis horizon (e.g. 50 epochs);
    `alpha_early_epochs` is the profile's early window in the plan's notation. Keys are
    `FIT_KEYS`; missing floats are NaN, counts ints, `alpha_full_few_points` a bool.
    """
    return fit_arrays(
        batch["step"].to_numpy(dtype=float),
        batch["epoch"].to_numpy(dtype=float),
        batch["loss"].to_numpy(dtype=float),
        val["epoch"].to_numpy(dtype=float),
        val["val_loss"].to_numpy(dtype=float),
        max_epoch,
        alpha_early_epochs,
    )


def fit_arrays(
    step: np.ndarray,
    epoch: np.ndarray,
    loss: np.ndarray,
    vep: np.ndarray,
    vloss: np.ndarray,
    max_epoch: float | None = None,
    alpha_early_epochs: tuple[int, int] = PLAN_ALPHA_EARLY,
) -> dict:
    """`fit_run` on plain arrays (batch step, epoch, loss; validation epoch, loss), so the
    warehouse can hand over Arrow columns without building DataFrames. The epoch bins are
    computed once and shared by every per-epoch quantity."""
    step, epoch, loss = _as_float(step), _as_float(epoch), _as_float(loss)
    vep, vloss = _as_float(vep), _as_float(vloss)
    if step.size > 1 and np.any(np.diff(step) < 0):
        order = np.argsort(step, kind="stable")
        step, epoch, loss = step[order], epoch[order], loss[order]
    if max_epoch is not None:
        keep = epoch <= max_epoch + _EPOCH_EPS
        step, epoch, loss = step[keep], epoch[keep], loss[keep]
        vkeep = vep <= max_epoch + _EPOCH_EPS
        vep, vloss = vep[vkeep], vloss[vkeep]

    usable = np.isfinite(step) & np.isfinite(epoch) & np.isfinite(loss) & (loss > 0)
    out = dict.fromkeys(FIT_KEYS, NAN)
    out.update(n_points=0, n_epoch_means=0, alpha_full_few_points=False)
    out["n_dropped_nonfinite"] = int(loss.size - usable.sum())
    step, epoch, loss = step[usable], epoch[usable], loss[usable]
    out["best_val_ce"], out["best_val_epoch"] = best_val(vep, vloss)
    if not loss.size:
        return _typed(out)

    ie = integer_epoch(epoch)
    epochs, inverse = np.unique(ie, return_inverse=True)
    counts = np.bincount(inverse)
    out["alpha_early"] = alpha_early(
        epochs, np.bincount(inverse, weights=loss) / counts, *alpha_early_epochs
    )
    sm = smoothed(loss, smoothing_window(epoch))
    hits = np.flatnonzero(sm <= BURN_IN_CE)
    if not hits.size:
        return _typed(out)

    i = int(hits[0])
    out["knee_epoch"], out["burn_in_step"], out["burn_in_loss"] = epoch[i], step[i], sm[i]
    after = slice(i, None)
    y = np.log(loss[after])
    raw = _loglog(np.log(step[after]), y)
    limit, sigma2 = r2_noise_limited(y, step[after])
    shape = raw.r_squared / limit if limit > 0 and math.isfinite(raw.r_squared) else NAN
    out.update(
        r_squared=raw.r_squared,
        r_squared_noise_limited=limit,
        r_squared_shape=shape,
        noise_var=sigma2,
        exponent=raw.exponent,
        intercept=raw.intercept,
        n_points=raw.n,
    )
    inv = inverse[after]
    cnt = np.bincount(inv, minlength=epochs.size)
    has = cnt > 0
    c = cnt[has]
    m_loss = np.bincount(inv, weights=loss[after], minlength=epochs.size)[has] / c
    m_step = np.bincount(inv, weights=step[after], minlength=epochs.size)[has] / c
    m_epoch = np.bincount(inv, weights=epoch[after], minlength=epochs.size)[has] / c
    smooth = fit_power_law(m_step, m_loss)
    few = m_loss.size < MIN_ALPHA_FULL_POINTS
    out.update(
        r_squared_epoch_mean=smooth.r_squared,
        exponent_epoch_mean=smooth.exponent,
        intercept_epoch_mean=smooth.intercept,
        n_epoch_means=smooth.n,
        alpha_full=NAN if few else linear_slope(m_epoch, m_loss),
        alpha_full_few_points=few,
    )
    return _typed(out)


def _typed(out: dict) -> dict:
    def cast(k: str, v):
        if k in _INT_KEYS:
            return int(v)
        if k == "alpha_full_few_points":
            return bool(v)
        return float(v)

    return {k: cast(k, v) for k, v in out.items()}
