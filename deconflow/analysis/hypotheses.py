"""Hypothesis tests of SPEC section 4 over the per-run fit table.

H1: more than 90% of runs have a power-law R² >= 0.98.
H2: rho(alpha_early, best_val_ce) >= 0.7 (Pearson and Spearman, pooled and per variant).

The value is used as written in the SPEC: alpha_early is the slope of a falling loss
(negative), so a positive rho means runs whose loss falls *slower* early end with a
*higher* validation loss. Every run left out is listed with its reason.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from deconflow.protocol import DIVERGED

NAN = float("nan")
RESULT_COLUMNS = [
    "hypothesis",
    "scope",
    "method",
    "value",
    "ci_low",
    "ci_high",
    "threshold",
    "n",
    "passed",
]
EXCLUDED_COLUMNS = ["hypothesis", "run_id", "reason"]
H1_METHOD = "r2>=0.98 fraction"
REASON_DIVERGED = DIVERGED
REASON_NO_ALPHA = "alpha_early not finite (run shorter than 15 epochs?)"
REASON_NO_VAL = "no finite validation loss"
REASON_NO_R2 = "r_squared not finite"


def _passed(value: float, threshold: float, strict: bool = False) -> bool:
    if not math.isfinite(value):
        return False
    return bool(value > threshold) if strict else bool(value >= threshold)


def _wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial fraction (sane at 0% and 100%)."""
    if n == 0:
        return NAN, NAN
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def h1_power_law_prevalence(
    r_squared, threshold_r2: float = 0.98, threshold_frac: float = 0.9
) -> dict:
    """Fraction of runs with R² >= threshold_r2; passes when it is > threshold_frac.

    Non-finite R² values are not counted (callers report them as excluded). The CI is
    the 95% Wilson interval of the fraction.
    """
    r2 = np.asarray(r_squared, dtype=float).ravel()
    r2 = r2[np.isfinite(r2)]
    n = int(r2.size)
    k = int(np.sum(r2 >= threshold_r2))
    value = k / n if n else NAN
    low, high = _wilson_interval(k, n)
    return {
        "value": value,
        "n": n,
        "passed": _passed(value, threshold_frac, strict=True),
        "threshold": threshold_frac,
        "threshold_r2": threshold_r2,
        "ci_low": low,
        "ci_high": high,
    }


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (b, n) arrays; NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


def correlations(x, y, n_boot: int = 1000, seed: int = 0) -> dict:
    """Pearson and Spearman correlation with 95% percentile-bootstrap CIs.

    Non-finite pairs are dropped first; fewer than 3 pairs gives NaNs. Resamples whose
    values are all equal (undefined correlation) are left out of the percentiles.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    keys = ["pearson", "pearson_ci_low", "pearson_ci_high"]
    keys += ["spearman", "spearman_ci_low", "spearman_ci_high"]
    out: dict = dict.fromkeys(keys, NAN)
    out["n"] = n
    if n < 3:
        return out
    out["pearson"] = float(_rowwise_pearson(x[None], y[None])[0])
    out["spearman"] = float(_rowwise_pearson(stats.rankdata(x)[None], stats.rankdata(y)[None])[0])
    if n_boot > 0:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        xb, yb = x[idx], y[idx]
        boot = {
            "pearson": _rowwise_pearson(xb, yb),
            "spearman": _rowwise_pearson(stats.rankdata(xb, axis=1), stats.rankdata(yb, axis=1)),
        }
        for name, values in boot.items():
            values = values[np.isfinite(values)]
            if values.size:
                low, high = np.percentile(values, [2.5, 97.5])
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(low), float(high)
    return out


def _is_diverged(outcome: pd.Series) -> pd.Series:
    return outcome.astype("string").str.lower().eq(DIVERGED).fillna(False).astype(bool)


def _finite(values: pd.Series) -> pd.Series:
    return pd.Series(
        np.isfinite(pd.to_numeric(values, errors="coerce").to_numpy(float)), index=values.index
    )


def _exclusions(df: pd.DataFrame, hypothesis: str, checks: list[tuple[pd.Series, str]]):
    """Split df into kept rows and an excluded table; each run gets its first failing reason."""
    keep = pd.Series(True, index=df.index)
    reasons = pd.Series(pd.NA, index=df.index, dtype="object")
    for bad, reason in checks:
        new = bad & keep
        reasons[new] = reason
        keep &= ~bad
    excluded = pd.DataFrame(
        {"hypothesis": hypothesis, "run_id": df.loc[~keep, "run_id"], "reason": reasons[~keep]}
    ).reset_index(drop=True)
    return df[keep], excluded[EXCLUDED_COLUMNS]


def _scopes(df: pd.DataFrame):
    yield "pooled", df
    for variant in sorted(df["variant"].dropna().unique().tolist()):
        yield str(variant), df[df["variant"] == variant]


def h2_table(
    df: pd.DataFrame, threshold: float = 0.7, n_boot: int = 1000, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H2 rows (pooled, then each variant; Pearson and Spearman) and the excluded runs.

    `df` has run_id, variant, alpha_early, best_val_ce, outcome. Diverged runs, runs with
    no finite alpha_early and runs with no finite best_val_ce are excluded, with reasons.
    Variants come from all runs, so a variant with every run excluded still shows (n=0).
    """
    kept, excluded = _exclusions(
        df,
        "H2",
        [
            (_is_diverged(df["outcome"]), REASON_DIVERGED),
            (~_finite(df["alpha_early"]), REASON_NO_ALPHA),
            (~_finite(df["best_val_ce"]), REASON_NO_VAL),
        ],
    )
    rows = []
    for scope, part in _scopes(df):
        sub = kept.loc[kept.index.intersection(part.index)]
        corr = correlations(sub["alpha_early"], sub["best_val_ce"], n_boot=n_boot, seed=seed)
        for method in ("pearson", "spearman"):
            value = corr[method]
            rows.append(
                {
                    "hypothesis": "H2",
                    "scope": scope,
                    "method": method,
                    "value": value,
                    "ci_low": corr[f"{method}_ci_low"],
                    "ci_high": corr[f"{method}_ci_high"],
                    "threshold": threshold,
                    "n": corr["n"],
                    "passed": _passed(value, threshold),
                }
            )
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), excluded


def h1_table(
    fits: pd.DataFrame, threshold_r2: float = 0.98, threshold_frac: float = 0.9
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H1 rows (pooled, then each variant) and the runs excluded (diverged, no finite R²)."""
    kept, excluded = _exclusions(
        fits,
        "H1",
        [
            (_is_diverged(fits["outcome"]), REASON_DIVERGED),
            (~_finite(fits["r_squared"]), REASON_NO_R2),
        ],
    )
    rows = []
    for scope, part in _scopes(fits):
        sub = kept.loc[kept.index.intersection(part.index)]
        h1 = h1_power_law_prevalence(sub["r_squared"], threshold_r2, threshold_frac)
        rows.append(
            {
                "hypothesis": "H1",
                "scope": scope,
                "method": H1_METHOD,
                "value": h1["value"],
                "ci_low": h1["ci_low"],
                "ci_high": h1["ci_high"],
                "threshold": threshold_frac,
                "n": h1["n"],
                "passed": h1["passed"],
            }
        )
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), excluded


def hypotheses_table(
    fits: pd.DataFrame,
    threshold_r2: float = 0.98,
    threshold_frac: float = 0.9,
    h2_threshold: float = 0.7,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H1 and H2 results stacked in one table, plus every exclusion (tagged by hypothesis).

    `fits` has run_id, variant, outcome, r_squared, alpha_early, best_val_ce.
    """
    h1, h1_excluded = h1_table(fits, threshold_r2, threshold_frac)
    h2, h2_excluded = h2_table(fits, h2_threshold, n_boot=n_boot, seed=seed)
    results = pd.concat([h1, h2], ignore_index=True)
    results["passed"] = results["passed"].astype(bool)
    results["n"] = results["n"].astype(int)
    excluded = pd.concat([h1_excluded, h2_excluded], ignore_index=True)
    return results, excluded[EXCLUDED_COLUMNS]
