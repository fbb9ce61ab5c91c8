"""Gradient-noise measures of SPEC section 3 (every 2 epochs): loss-signal spectra and
gradient variance across micro-batches."""

from __future__ import annotations

import numpy as np
import torch

# scipy.signal is imported where it is used: it costs about 1.5 s, and a short run measures
# no noise at all (the first measurement is at epoch 2).

NAN = float("nan")


def ewma(x, alpha: float) -> np.ndarray:
    """Exponentially weighted moving average y_i = alpha x_i + (1 - alpha) y_{i-1}, y_0 = x_0.

    Used as the smooth trend of the loss signal; what is left around it is noise.
    """
    from scipy import signal

    x = np.asarray(x, dtype=float).ravel()
    if x.size == 0:
        return x.copy()
    # lfilter runs the recursion in C; zi seeds it so that y_0 = x_0.
    y, _ = signal.lfilter([alpha], [1.0, alpha - 1.0], x, zi=[(1.0 - alpha) * x[0]])
    return y


def psd(x, fs: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Welch power spectral density of the linearly detrended signal.

    The loss falls steadily; detrending keeps that trend from dominating the low end.
    """
    from scipy import signal

    x = np.asarray(x, dtype=float).ravel()
    x = signal.detrend(x, type="linear")
    return signal.welch(x, fs=fs, nperseg=min(256, x.size))


def psd_tail_ratio(x, tail_fraction: float = 0.5) -> float:
    """Share of the (non-DC) spectral power in the top `tail_fraction` of frequencies.

    White noise spreads evenly (ratio ~ tail_fraction); a slow drift or oscillation puts
    its power at the low end (ratio ~ 0). NaN when the signal is too short or has no power.
    """
    from scipy import signal

    x = np.asarray(x, dtype=float).ravel()
    if x.size < 4 or not np.all(np.isfinite(x)):
        return NAN
    scale = max(1.0, float(np.max(np.abs(x))))
    if np.std(signal.detrend(x, type="linear")) <= 1e-12 * scale:
        return NAN  # a straight line: only rounding noise is left to take a spectrum of
    freqs, power = psd(x)
    keep = freqs > 0
    freqs, power = freqs[keep], power[keep]
    total = float(power.sum())
    if total <= 0.0:
        return NAN
    cutoff = freqs.max() * (1.0 - tail_fraction)
    return float(power[freqs > cutoff].sum()) / total


def residual_power(x, alpha: float = 0.1) -> float:
    """Mean squared residual of x around its EWMA: the short-time fluctuation of the loss."""
    x = np.asarray(x, dtype=float).ravel()
    if x.size == 0:
        return NAN
    return float(np.mean((x - ewma(x, alpha)) ** 2))


def gradient_variance(grads: torch.Tensor) -> float:
    """Mean over parameters of the unbiased variance across k micro-batch gradients.

    `grads` is (k, p); the result is trace(gradient covariance) / p. NaN if k < 2.
    """
    if grads.ndim != 2 or grads.shape[0] < 2:
        return NAN
    return float(grads.double().var(dim=0, unbiased=True).mean())
