"""Hypothesis tests of SPEC section 4 over the per-run fit table.

H1: more than 90% of runs have a power-law R² >= 0.98.
H2: rho(alpha_early, best_val_ce) >= 0.7 (Pearson and Spearman, pooled and per variant).

Verdicts respect their uncertainty: a row passes (`passed`) only when its 95% CI clears
the threshold (H1: the Wilson lower bound of the fraction > 0.9; H2: the bootstrap lower
bound of rho >= 0.7), with at least `MIN_N` runs and a non-degenerate CI. What the point
estimate alone would say is reported beside it (`point_passed`), with a `note` on why the
two differ. H2 is also reported within each learning rate and as a partial correlation
controlling for the learning rate (centred within each lr), so lr confounding is visible.

The value is used as written in the SPEC: alpha_early is the slope of a falling loss
(negative), so a positive rho means runs whose loss falls *slower* early end with a
*higher* validation loss. Every run left out is listed with its reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pandas as pd
from scipy import stats

from deconflow.analysis.fits import BURN_IN_CE
from deconflow.protocol import DIVERGED
from deconflow.sweep import format_number

NAN = float("nan")
Z95 = 1.959963984540054  # two-sided 95% normal quantile
MIN_N = 8  # fewer runs (or effective runs of a partial correlation): no verdict can pass
MIN_BOOT_DEFINED = 0.95  # share of bootstrap resamples with a defined correlation
ZERO_WIDTH = 1e-9  # a CI narrower than this is degenerate (e.g. [1, 1] on a perfect line)

# H1 smoothing rules: the run_fits column whose R² H1 counts. "raw" is the plan's rule.
H1_RULES = {"raw": "r_squared", "epoch_mean": "r_squared_epoch_mean"}
DEFAULT_H1_RULE = "raw"
H2_SMOOTHING = "epoch_mean"  # alpha_early is a slope of per-epoch mean losses

RESULT_DTYPES = {
    "hypothesis": "string",
    "scope": "string",
    "method": "string",
    "smoothing": "string",
    "value": "Float64",
    "ci_low": "Float64",
    "ci_high": "Float64",
    "ci_method": "string",
    "threshold": "Float64",
    "n": "Int64",
    "passed": "bool",
    "point_passed": "bool",
    "note": "string",
}
RESULT_COLUMNS = list(RESULT_DTYPES)
EXCLUDED_DTYPES = {"hypothesis": "string", "run_id": "string", "reason": "string"}
EXCLUDED_COLUMNS = list(EXCLUDED_DTYPES)
H1_METHOD = "r2>=0.98 fraction"
H2_METHODS = ("pearson", "spearman")
PARTIAL_SUFFIX = "_partial_lr"
REASON_DIVERGED = DIVERGED
REASON_NO_BURN_IN = f"no burn-in: train CE never <= {BURN_IN_CE!r}"
REASON_NO_ALPHA = "alpha_early not finite (run shorter than its alpha_early window?)"
REASON_NO_VAL = "no finite validation loss"


def _reason_no_r2(column: str) -> str:
    return f"{column} not finite"


REASON_NO_R2 = _reason_no_r2(H1_RULES[DEFAULT_H1_RULE])


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial fraction k/n, inside [0, 1].

    The bounds at k = 0 and k = n are exactly 0 and 1 (the formula's rounding would give
    1e-17 there); NaNs for n = 0.
    """
    if n <= 0:
        return NAN, NAN
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k <= 0 else min(1.0, max(0.0, centre - half))
    high = 1.0 if k >= n else min(1.0, max(0.0, centre + half))
    return low, high


_wilson_interval = wilson_interval  # the old private name


def h1_power_law_prevalence(
    r_squared, threshold_r2: float = 0.98, threshold_frac: float = 0.9, min_n: int = MIN_N
) -> dict:
    """Fraction of runs with R² >= threshold_r2, its Wilson 95% CI and both verdicts.

    `passed`: n >= min_n and the CI's lower bound > threshold_frac ("more than 90%").
    `point_passed`: the fraction itself > threshold_frac. Non-finite R² values are not
    counted (callers report them as excluded).
    """
    r2 = np.asarray(r_squared, dtype=float).ravel()
    r2 = r2[np.isfinite(r2)]
    n = int(r2.size)
    k = int(np.sum(r2 >= threshold_r2))
    value = k / n if n else NAN
    low, high = wilson_interval(k, n)
    point = bool(n and value > threshold_frac)
    passed = bool(n >= min_n and low > threshold_frac)
    note = f"{k} of {n} runs have R² >= {threshold_r2:g}"
    if n < min_n:
        note += f"; n < {min_n}: cannot pass"
    elif point and not passed:
        note += f"; CI lower bound {low:.3f} <= {threshold_frac:g}"
    return {
        "value": value,
        "k": k,
        "n": n,
        "passed": passed,
        "point_passed": point,
        "threshold": threshold_frac,
        "threshold_r2": threshold_r2,
        "ci_low": low,
        "ci_high": high,
        "note": note,
    }


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (b, n) arrays; NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


def _centre_within(v: np.ndarray, g: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Each row of `v` minus the mean of its group (row-wise groups `g`): lr partialled out."""
    out = v.astype(float, copy=True)
    for level in levels:
        m = g == level
        count = m.sum(axis=1, keepdims=True)
        total = np.where(m, v, 0.0).sum(axis=1, keepdims=True)
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        out = np.where(m, v - mean, out)
    return out


def _corr_rows(x: np.ndarray, y: np.ndarray, g: np.ndarray | None, levels) -> dict:
    """Pearson and Spearman r of each row (partial on `g` when given)."""
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    if g is not None:
        x, y = _centre_within(x, g, levels), _centre_within(y, g, levels)
        rx, ry = _centre_within(rx, g, levels), _centre_within(ry, g, levels)
    return {"pearson": _rowwise_pearson(x, y), "spearman": _rowwise_pearson(rx, ry)}


def correlations(x, y, n_boot: int = 1000, seed: int = 0, groups=None) -> dict:
    """Pearson and Spearman correlation with 95% percentile-bootstrap CIs.

    Non-finite pairs are dropped first; fewer than 3 pairs gives NaNs. With `groups`
    (e.g. each run's lr), both are partial correlations controlling for the group: x, y
    (Spearman: their ranks) are centred within each group before correlating, in the
    sample and in every resample. Resamples whose correlation is undefined (constant
    values) are left out of the percentiles; `<method>_boot_defined` is their share kept.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    g = None if groups is None else np.asarray(groups).ravel()[ok]
    x, y = x[ok], y[ok]
    n = int(x.size)
    levels = np.unique(g) if g is not None else None
    out: dict = {"n": n, "n_groups": int(levels.size) if levels is not None else 1}
    for method in H2_METHODS:
        out.update(
            {
                method: NAN,
                f"{method}_ci_low": NAN,
                f"{method}_ci_high": NAN,
                f"{method}_boot_defined": NAN,
            }
        )
    if n < 3:
        return out
    point = _corr_rows(x[None], y[None], None if g is None else g[None], levels)
    for method in H2_METHODS:
        out[method] = float(point[method][0])
    if n_boot > 0:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        boot = _corr_rows(x[idx], y[idx], None if g is None else g[idx], levels)
        for method, values in boot.items():
            values = values[np.isfinite(values)]
            out[f"{method}_boot_defined"] = values.size / n_boot
            if values.size:
                low, high = np.clip(np.percentile(values, [2.5, 97.5]), -1.0, 1.0)
                out[f"{method}_ci_low"], out[f"{method}_ci_high"] = float(low), float(high)
    return out


def _is_diverged(outcome: pd.Series) -> pd.Series:
    return outcome.astype("string").str.lower().eq(DIVERGED).fillna(False).astype(bool)


def _floats(values: pd.Series) -> np.ndarray:
    """A numeric column as float64 with NaN for missing (NA, None, non-numbers)."""
    return pd.to_numeric(values, errors="coerce").astype("Float64").to_numpy(float, na_value=NAN)


def _finite(values: pd.Series) -> pd.Series:
    return pd.Series(np.isfinite(_floats(values)), index=values.index)


def _no_burn_in(df: pd.DataFrame) -> pd.Series:
    """Runs without a burn-in (no knee epoch); all False where the column is absent."""
    if "knee_epoch" not in df:
        return pd.Series(False, index=df.index)
    return ~_finite(df["knee_epoch"])


def _exclusions(df: pd.DataFrame, hypothesis: str, checks: list[tuple[pd.Series, str]]):
    """Split df into kept rows and an excluded table; each run gets its first failing reason."""
    keep = pd.Series(True, index=df.index)
    reasons = pd.Series(pd.NA, index=df.index, dtype="string")
    for bad, reason in checks:
        new = bad & keep
        reasons[new] = reason
        keep &= ~bad
    excluded = pd.DataFrame(
        {"hypothesis": hypothesis, "run_id": df.loc[~keep, "run_id"], "reason": reasons[~keep]}
    ).reset_index(drop=True)
    return df[keep], excluded[EXCLUDED_COLUMNS].astype(EXCLUDED_DTYPES)


def _variants(df: pd.DataFrame) -> list[str]:
    return sorted(str(v) for v in df["variant"].dropna().unique())


def _lrs(df: pd.DataFrame) -> list[float]:
    if "lr" not in df:
        return []
    return sorted(float(v) for v in pd.to_numeric(df["lr"], errors="coerce").dropna().unique())


def _lr_scope(lr: float) -> str:
    return f"lr={format_number(lr)}"


def _variant_scope(variant: str) -> str:
    return f"variant={variant}"


def _h1_scopes(df: pd.DataFrame) -> Iterator[tuple[str, pd.Index]]:
    yield "pooled", df.index
    for variant in _variants(df):
        yield _variant_scope(variant), df.index[df["variant"] == variant]


def _h2_scopes(df: pd.DataFrame) -> Iterator[tuple[str, pd.Index, bool]]:
    """(scope, rows, partial on lr?): pooled, each variant, each lr, each variant x lr
    that has runs."""
    lrs = _lrs(df)
    lr = pd.Series(_floats(df["lr"]), index=df.index) if lrs else None
    yield "pooled", df.index, bool(lrs)
    for variant in _variants(df):
        yield _variant_scope(variant), df.index[df["variant"] == variant], bool(lrs)
    for value in lrs:
        yield _lr_scope(value), df.index[lr == value], False
    for variant in _variants(df):
        for value in lrs:
            rows = df.index[(df["variant"] == variant) & (lr == value)]
            if len(rows):  # a combination the sweep has runs of
                yield f"{_variant_scope(variant)}, {_lr_scope(value)}", rows, False


def _bootstrap_label(n_boot: int) -> str:
    return f"bootstrap percentile 95% ({n_boot} resamples)"


def _h2_row(
    scope: str, method: str, corr: dict, threshold: float, n_boot: int, partial: bool, min_n: int
) -> dict:
    """One H2 row: CI-based verdict, point verdict, and why a CI cannot decide."""
    n = corr["n"]
    n_eff = n - (corr["n_groups"] - 1) if partial else n
    value = corr[method]
    low, high = corr[f"{method}_ci_low"], corr[f"{method}_ci_high"]
    point = bool(math.isfinite(value) and value >= threshold)
    notes = []
    if partial:
        notes.append(f"partial on lr ({corr['n_groups']} levels, effective n {n_eff})")
    if n_eff < min_n:
        notes.append(f"n {'(effective) ' if partial else ''}< {min_n}: no CI, cannot pass")
        low = high = NAN
    elif not math.isfinite(value):
        notes.append("correlation undefined (constant values)")
    elif not corr[f"{method}_boot_defined"] >= MIN_BOOT_DEFINED:
        notes.append(
            f"degenerate bootstrap: only {corr[f'{method}_boot_defined']:.0%} of resamples "
            "give a defined correlation"
        )
    elif not high - low > ZERO_WIDTH:
        notes.append(f"degenerate bootstrap: zero-width CI [{low:.3g}, {high:.3g}]")
    elif point and not low >= threshold:
        notes.append(f"CI lower bound {low:.3f} < {threshold:g}")
    ok = (
        n_eff >= min_n
        and math.isfinite(value)
        and corr[f"{method}_boot_defined"] >= MIN_BOOT_DEFINED
        and high - low > ZERO_WIDTH
        and low >= threshold
    )
    return {
        "hypothesis": "H2",
        "scope": scope,
        "method": method + (PARTIAL_SUFFIX if partial else ""),
        "smoothing": H2_SMOOTHING,
        "value": value,
        "ci_low": low,
        "ci_high": high,
        "ci_method": _bootstrap_label(n_boot) if math.isfinite(low) else "none",
        "threshold": threshold,
        "n": n,
        "passed": bool(ok),
        "point_passed": point,
        "note": "; ".join(notes),
    }


def _typed_results(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).astype(RESULT_DTYPES)


def h2_table(
    df: pd.DataFrame,
    threshold: float = 0.7,
    n_boot: int = 1000,
    seed: int = 0,
    min_n: int = MIN_N,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H2 rows and the excluded runs.

    `df` has run_id, variant, lr, alpha_early, best_val_ce, outcome (and knee_epoch).
    Scopes: pooled and each variant (Pearson, Spearman, and both as partial correlations
    controlling for lr), each lr and each variant x lr (Pearson, Spearman). Diverged runs,
    runs without burn-in, runs with no finite alpha_early and runs with no finite
    best_val_ce are excluded, with reasons. Scopes come from all runs, so a scope whose
    runs are all excluded still shows (n=0).
    """
    kept, excluded = _exclusions(
        df,
        "H2",
        [
            (_is_diverged(df["outcome"]), REASON_DIVERGED),
            (_no_burn_in(df), REASON_NO_BURN_IN),
            (~_finite(df["alpha_early"]), REASON_NO_ALPHA),
            (~_finite(df["best_val_ce"]), REASON_NO_VAL),
        ],
    )
    rows = []
    for scope, index, with_partial in _h2_scopes(df):
        sub = kept.loc[kept.index.intersection(index)]
        x, y = _floats(sub["alpha_early"]), _floats(sub["best_val_ce"])
        corr = correlations(x, y, n_boot=n_boot, seed=seed)
        for method in H2_METHODS:
            rows.append(_h2_row(scope, method, corr, threshold, n_boot, False, min_n))
        if with_partial:
            groups = _floats(sub["lr"])
            pcorr = correlations(x, y, n_boot=n_boot, seed=seed, groups=groups)
            for method in H2_METHODS:
                rows.append(_h2_row(scope, method, pcorr, threshold, n_boot, True, min_n))
    return _typed_results(rows), excluded


def h1_table(
    fits: pd.DataFrame,
    threshold_r2: float = 0.98,
    threshold_frac: float = 0.9,
    rule: str = DEFAULT_H1_RULE,
    min_n: int = MIN_N,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H1 rows (pooled, then each variant) and the runs excluded.

    `rule` picks the R² counted (`H1_RULES`: "raw", the plan's per-batch fit, or
    "epoch_mean", the fit to per-epoch means) and is named in every row's `smoothing`.
    Diverged runs, runs without burn-in and runs without a finite R² are excluded.
    """
    if rule not in H1_RULES:
        raise ValueError(f"unknown H1 smoothing rule {rule!r}; expected one of {list(H1_RULES)}")
    column = H1_RULES[rule]
    kept, excluded = _exclusions(
        fits,
        "H1",
        [
            (_is_diverged(fits["outcome"]), REASON_DIVERGED),
            (_no_burn_in(fits), REASON_NO_BURN_IN),
            (~_finite(fits[column]), _reason_no_r2(column)),
        ],
    )
    rows = []
    for scope, index in _h1_scopes(fits):
        sub = kept.loc[kept.index.intersection(index)]
        h1 = h1_power_law_prevalence(_floats(sub[column]), threshold_r2, threshold_frac, min_n)
        rows.append(
            {
                "hypothesis": "H1",
                "scope": scope,
                "method": H1_METHOD.replace("0.98", f"{threshold_r2:g}"),
                "smoothing": rule,
                "value": h1["value"],
                "ci_low": h1["ci_low"],
                "ci_high": h1["ci_high"],
                "ci_method": "wilson 95%" if h1["n"] else "none",
                "threshold": threshold_frac,
                "n": h1["n"],
                "passed": h1["passed"],
                "point_passed": h1["point_passed"],
                "note": h1["note"],
            }
        )
    return _typed_results(rows), excluded


def hypotheses_table(
    fits: pd.DataFrame,
    threshold_r2: float = 0.98,
    threshold_frac: float = 0.9,
    h2_threshold: float = 0.7,
    n_boot: int = 1000,
    seed: int = 0,
    h1_rule: str = DEFAULT_H1_RULE,
    min_n: int = MIN_N,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H1 and H2 results stacked in one typed table, plus every exclusion (by hypothesis).

    `fits` is the run_fits table (run_id, variant, lr, outcome, knee_epoch, the R²
    columns, alpha_early, best_val_ce). `h1_rule` is H1's smoothing rule (`H1_RULES`).
    """
    h1, h1_excluded = h1_table(fits, threshold_r2, threshold_frac, h1_rule, min_n)
    h2, h2_excluded = h2_table(fits, h2_threshold, n_boot=n_boot, seed=seed, min_n=min_n)
    results = pd.concat([h1, h2], ignore_index=True).astype(RESULT_DTYPES)
    excluded = pd.concat([h1_excluded, h2_excluded], ignore_index=True)
    return results, excluded[EXCLUDED_COLUMNS].astype(EXCLUDED_DTYPES)
