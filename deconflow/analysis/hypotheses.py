"""Hypothesis tests of SPEC section 4 over the per-run fit table, with one verdict each.

H1: more than 90% of runs have a power-law R² >= 0.98.
H2: rho(alpha_early, best_val_ce) >= 0.7.

Every hypothesis has exactly one pre-declared **primary** row (`primary` True,
`tier` 'primary'); the others are 'secondary' (per variant, Holm-adjusted across the
variants) or 'exploratory' (pooled, per lr, per variant x lr, other R² rules: shown,
never the answer). `verdict` is PASS when the 95% CI clears the threshold, FAIL when it
lies wholly on the wrong side, INCONCLUSIVE otherwise (or with too few runs).

- H1 primary: the fraction of runs whose *shape* R² (`r_squared_shape`, the raw R²
  divided by the run's noise-limited R² estimate) is >= 0.98, Wilson 95% CI. It tests
  the power-law shape, not how noisy the batches are. The plan's raw-R² rule is kept as
  an exploratory row.
- H2 primary: never pooled across variants. Pearson r within each variant, combined by
  the Fisher-z mean weighted by n - 3, with a stratified (within-variant) bootstrap BCa
  95% CI: resampling runs within their variant keeps each stratum's n and weight fixed,
  and BCa corrects the skew and bias of r's sampling distribution that makes percentile
  intervals too narrow at n = 6-8 per stratum.
- Secondary and exploratory CIs: Fisher-z normal intervals (Spearman with the
  Fieller-Hartley-Pearson variance 1.06 / (n - 3)); secondary verdicts use Holm-adjusted
  one-sided p-values (`p_holm`) against the threshold, at 0.025 per side.

The value is used as written in the SPEC: alpha_early is the slope of a falling loss
(negative), so a positive rho means runs whose loss falls *slower* early end with a
*higher* validation loss. Every run left out is listed with its reason. H2 keeps runs
without a burn-in: SPEC section 4 defines alpha_early over fixed epochs (5 to 15 as the
plan counts them), which does not depend on the burn-in.
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
ALPHA_SIDE = 0.025  # one side of a two-sided 95% interval
MIN_N = 8  # fewer runs: no CI, the verdict is INCONCLUSIVE
MIN_STRATUM_N = 4  # a stratum needs n - 3 > 0 to carry Fisher-z weight
N_BOOT = 2000
SPEARMAN_VAR = 1.06  # Fieller, Hartley & Pearson (1957): var(atanh r_s) ~ 1.06 / (n - 3)
R_CLIP = 1.0 - 1e-12  # atanh(+-1) is infinite
ZERO_WIDTH = 1e-9  # a bootstrap CI narrower than this is degenerate (a perfect line)

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
PRIMARY, SECONDARY, EXPLORATORY = "primary", "secondary", "exploratory"
TIER_ORDER = {PRIMARY: 0, SECONDARY: 1, EXPLORATORY: 2}

# H1 R² rules: the run_fits column H1 counts. "shape" is the primary (pre-declared);
# "raw" is the plan's literal rule, "epoch_mean" the fit to per-epoch means.
H1_RULES = {
    "shape": "r_squared_shape",
    "raw": "r_squared",
    "epoch_mean": "r_squared_epoch_mean",
}
DEFAULT_H1_RULE = "shape"
H2_SMOOTHING = "epoch_mean"  # alpha_early is a slope of per-epoch mean losses

RESULT_DTYPES = {
    "hypothesis": "string",
    "tier": "string",
    "primary": "bool",
    "scope": "string",
    "method": "string",
    "smoothing": "string",
    "value": "Float64",
    "ci_low": "Float64",
    "ci_high": "Float64",
    "ci_method": "string",
    "threshold": "Float64",
    "n": "Int64",
    "verdict": "string",
    "p_holm": "Float64",
    "passed": "bool",
    "point_passed": "bool",
    "note": "string",
}
RESULT_COLUMNS = list(RESULT_DTYPES)
VERDICT_COLUMNS = [
    "hypothesis",
    "tier",
    "scope",
    "method",
    "value",
    "ci_low",
    "ci_high",
    "threshold",
    "n",
    "verdict",
]
EXCLUDED_DTYPES = {"hypothesis": "string", "run_id": "string", "reason": "string"}
EXCLUDED_COLUMNS = list(EXCLUDED_DTYPES)
H2_METHODS = ("pearson", "spearman")
PARTIAL_SUFFIX = "_partial_lr"
H2_PRIMARY_SCOPE = "within variant, combined"
H2_PRIMARY_METHOD = "pearson, Fisher-z mean of within-variant r (weights n-3)"
REASON_DIVERGED = DIVERGED
REASON_NO_BURN_IN = f"no burn-in: smoothed train CE never <= {BURN_IN_CE!r}"
REASON_NO_ALPHA = "alpha_early not finite (run shorter than its alpha_early window?)"
REASON_NO_VAL = "no finite validation loss"


def _reason_no_r2(column: str) -> str:
    return f"{column} not finite"


REASON_NO_R2 = _reason_no_r2(H1_RULES[DEFAULT_H1_RULE])


# --- verdicts -------------------------------------------------------------------------------


def verdict(low: float, high: float, threshold: float, strict: bool = False) -> str:
    """PASS if the CI clears the threshold, FAIL if it lies wholly below, else INCONCLUSIVE.

    `strict`: the claim is "> threshold" (H1's "more than 90%"), else ">= threshold".
    A missing CI is INCONCLUSIVE: no evidence either way.
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if (low > threshold) if strict else (low >= threshold):
        return PASS
    if (high <= threshold) if strict else (high < threshold):
        return FAIL
    return INCONCLUSIVE


def holm(p: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN and does not count in m)."""
    arr = np.asarray(p, dtype=float)
    ok = np.flatnonzero(np.isfinite(arr))
    out = np.full(arr.size, NAN)
    m = ok.size
    order = ok[np.argsort(arr[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * arr[i]))
        out[i] = running
    return out.tolist()


def _holm_verdict(p_pass: float, p_fail: float) -> str:
    if math.isfinite(p_pass) and p_pass < ALPHA_SIDE:
        return PASS
    if math.isfinite(p_fail) and p_fail < ALPHA_SIDE:
        return FAIL
    return INCONCLUSIVE


# --- H1 -------------------------------------------------------------------------------------


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


def h1_power_law_prevalence(
    r_squared, threshold_r2: float = 0.98, threshold_frac: float = 0.9, min_n: int = MIN_N
) -> dict:
    """Fraction of runs with R² >= threshold_r2, its Wilson 95% CI and verdict.

    `verdict`: PASS when the CI's lower bound > threshold_frac ("more than 90%"), FAIL
    when its upper bound <= it, INCONCLUSIVE otherwise or below `min_n` runs. One-sided
    exact binomial p-values against threshold_frac (`p_pass`, `p_fail`) feed Holm.
    """
    r2 = np.asarray(r_squared, dtype=float).ravel()
    r2 = r2[np.isfinite(r2)]
    n = int(r2.size)
    k = int(np.sum(r2 >= threshold_r2))
    value = k / n if n else NAN
    low, high = wilson_interval(k, n)
    v = verdict(low, high, threshold_frac, strict=True) if n >= min_n else INCONCLUSIVE
    note = f"{k} of {n} runs have R² >= {threshold_r2:g}"
    if n < min_n:
        note += f"; n < {min_n}: inconclusive"
    p_pass = float(stats.binom.sf(k - 1, n, threshold_frac)) if n else NAN  # P(X >= k)
    p_fail = float(stats.binom.cdf(k, n, threshold_frac)) if n else NAN  # P(X <= k)
    return {
        "value": value,
        "k": k,
        "n": n,
        "verdict": v,
        "passed": v == PASS,
        "point_passed": bool(n and value > threshold_frac),
        "threshold": threshold_frac,
        "threshold_r2": threshold_r2,
        "ci_low": low,
        "ci_high": high,
        "p_pass": p_pass if n >= min_n else NAN,
        "p_fail": p_fail if n >= min_n else NAN,
        "note": note,
    }


# --- correlations ---------------------------------------------------------------------------


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (b, n) arrays; NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(_rowwise_pearson(x[None], y[None])[0]) if x.size >= 3 else NAN


def _centre_within(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """`v` minus the mean of its group: the group (lr) partialled out."""
    out = v.astype(float, copy=True)
    for level in np.unique(g):
        m = g == level
        out[m] = v[m] - v[m].mean()
    return out


def fisher_ci(r: float, n_eff: float, var: float = 1.0, threshold: float = NAN) -> dict:
    """Fisher-z 95% CI of a correlation and one-sided p-values against `threshold`.

    se = sqrt(var / n_eff) on the atanh scale (n_eff = n - 3, less partialled groups).
    """
    out = {"ci_low": NAN, "ci_high": NAN, "p_pass": NAN, "p_fail": NAN}
    if not (math.isfinite(r) and n_eff > 0):
        return out
    z = math.atanh(max(-R_CLIP, min(R_CLIP, r)))
    se = math.sqrt(var / n_eff)
    out["ci_low"], out["ci_high"] = math.tanh(z - Z95 * se), math.tanh(z + Z95 * se)
    if math.isfinite(threshold):
        t = (z - math.atanh(threshold)) / se
        out["p_pass"], out["p_fail"] = float(stats.norm.sf(t)), float(stats.norm.cdf(t))
    return out


def correlation(x, y, method: str = "pearson", groups=None) -> tuple[float, int, int]:
    """(r, n, groups) of finite pairs; Spearman on ranks; partial on `groups` if given."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    g = None if groups is None else np.asarray(groups).ravel()[ok]
    if method == "spearman":
        x, y = stats.rankdata(x), stats.rankdata(y)
    n_groups = 1
    if g is not None:
        n_groups = int(np.unique(g).size)
        x, y = _centre_within(x, g), _centre_within(y, g)
    return _pearson(x, y), int(x.size), n_groups


def correlations(x, y, groups=None, threshold: float = NAN) -> dict:
    """Pearson and Spearman r with Fisher-z 95% CIs (and p-values against `threshold`)."""
    out: dict = {}
    for method in H2_METHODS:
        r, n, n_groups = correlation(x, y, method, groups)
        n_eff = n - 3 - (n_groups - 1)
        var = SPEARMAN_VAR if method == "spearman" else 1.0
        ci = fisher_ci(r, n_eff, var, threshold)
        out.update({method: r, "n": n, "n_groups": n_groups, "n_eff": n_eff})
        out.update({f"{method}_{k}": v for k, v in ci.items()})
    return out


def _combined_z(r: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Fisher-z mean of per-stratum r (last axis), weights n - 3; NaN where undefined."""
    w = np.clip(n - 3.0, 0.0, None)
    z = np.arctanh(np.clip(r, -R_CLIP, R_CLIP))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.tanh((z * w).sum(axis=-1) / w.sum(axis=-1))


def stratified_correlation(
    x, y, strata, n_boot: int = N_BOOT, seed: int = 0, min_stratum_n: int = MIN_STRATUM_N
) -> dict:
    """Within-stratum Pearson r combined across strata, with a stratified BCa 95% CI.

    Strata with fewer than `min_stratum_n` finite pairs carry no Fisher-z weight and are
    left out (listed in `strata_used`). Bootstrap: runs resampled within their stratum;
    BCa's acceleration from the leave-one-run-out jackknife. Resamples with a constant
    stratum (undefined r) are dropped; `boot_defined` is the share kept.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    s = np.asarray(strata).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    groups = []
    for level in sorted(set(s[ok].tolist()), key=str):
        m = ok & (s == level)
        if m.sum() >= min_stratum_n:
            groups.append((level, x[m], y[m]))
    out = {
        "value": NAN,
        "ci_low": NAN,
        "ci_high": NAN,
        "n": int(sum(g[1].size for g in groups)),
        "strata_used": [str(g[0]) for g in groups],
        "strata_r": {str(g[0]): _pearson(g[1], g[2]) for g in groups},
        "boot_defined": NAN,
    }
    if not groups:
        return out
    sizes = np.array([g[1].size for g in groups], dtype=float)
    r = np.array([_pearson(g[1], g[2]) for g in groups])
    theta = float(_combined_z(r, sizes))
    out["value"] = theta
    if not math.isfinite(theta) or n_boot <= 0:
        return out
    rng = np.random.default_rng(seed)
    boot_r = np.empty((n_boot, len(groups)))
    for j, (_, gx, gy) in enumerate(groups):
        idx = rng.integers(0, gx.size, size=(n_boot, gx.size))
        boot_r[:, j] = _rowwise_pearson(gx[idx], gy[idx])
    boot = _combined_z(boot_r, sizes)
    boot = boot[np.isfinite(boot)]
    out["boot_defined"] = boot.size / n_boot
    if boot.size < 0.95 * n_boot:
        return out
    jack = []
    for j, (_, gx, gy) in enumerate(groups):
        for i in range(gx.size):
            keep = np.arange(gx.size) != i
            rj, nj = r.copy(), sizes.copy()
            rj[j], nj[j] = _pearson(gx[keep], gy[keep]), gx.size - 1
            jack.append(float(_combined_z(rj, nj)))
    out["ci_low"], out["ci_high"] = bca_interval(theta, boot, np.array(jack))
    return out


def bca_interval(theta: float, boot: np.ndarray, jack: np.ndarray) -> tuple[float, float]:
    """Bias-corrected and accelerated 95% interval (Efron 1987) from resamples and jackknife."""
    prop = (np.sum(boot < theta) + 0.5 * np.sum(boot == theta)) / boot.size
    prop = min(max(prop, 1.0 / (2 * boot.size)), 1 - 1.0 / (2 * boot.size))
    z0 = stats.norm.ppf(prop)
    jack = jack[np.isfinite(jack)]
    d = jack.mean() - jack if jack.size else np.array([0.0])
    den = 6.0 * float(np.sum(d * d)) ** 1.5
    a = float(np.sum(d**3)) / den if den > 0 else 0.0
    qs = []
    for zq in (-Z95, Z95):
        q = stats.norm.cdf(z0 + (z0 + zq) / (1 - a * (z0 + zq)))
        qs.append(float(np.quantile(boot, min(max(q, 0.0), 1.0))))
    return qs[0], qs[1]


# --- exclusions and scopes ------------------------------------------------------------------


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


def _row(hypothesis: str, tier: str, scope: str, method: str, smoothing: str, **kw) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS, NAN)
    row.update(
        hypothesis=hypothesis,
        tier=tier,
        primary=tier == PRIMARY,
        scope=scope,
        method=method,
        smoothing=smoothing,
        note="",
    )
    row.update(kw)
    row["passed"] = row["verdict"] == PASS
    return row


def _typed_results(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).astype(RESULT_DTYPES)


# --- H2 -------------------------------------------------------------------------------------


def _h2_primary(kept: pd.DataFrame, threshold: float, n_boot: int, seed: int, min_n: int):
    x, y = _floats(kept["alpha_early"]), _floats(kept["best_val_ce"])
    res = stratified_correlation(x, y, kept["variant"].astype(str).to_numpy(), n_boot, seed)
    low, high = res["ci_low"], res["ci_high"]
    notes = [
        "strata: " + ", ".join(f"{k} r={v:.3f}" for k, v in res["strata_r"].items())
        if res["strata_r"]
        else f"no variant with >= {MIN_STRATUM_N} runs"
    ]
    if res["n"] < min_n:
        notes.append(f"n < {min_n}: inconclusive")
        low = high = NAN
    elif not res["boot_defined"] >= 0.95:
        notes.append("degenerate bootstrap (constant resamples): no CI")
    elif not high - low > ZERO_WIDTH:
        notes.append(f"degenerate bootstrap: zero-width CI [{low:.3g}, {high:.3g}]")
        low = high = NAN
    v = verdict(low, high, threshold)
    return _row(
        "H2",
        PRIMARY,
        f"{H2_PRIMARY_SCOPE} ({len(res['strata_used'])} variants)",
        H2_PRIMARY_METHOD,
        H2_SMOOTHING,
        value=res["value"],
        ci_low=low,
        ci_high=high,
        ci_method=(
            f"stratified bootstrap BCa 95% ({n_boot} resamples within variant)"
            if math.isfinite(low)
            else "none"
        ),
        threshold=threshold,
        n=res["n"],
        verdict=v,
        point_passed=bool(math.isfinite(res["value"]) and res["value"] >= threshold),
        note="; ".join(notes),
    )


def _h2_corr_row(
    tier: str, scope: str, method: str, corr: dict, threshold: float, min_n: int, partial: bool
) -> dict:
    r, n = corr[method], corr["n"]
    low, high = corr[f"{method}_ci_low"], corr[f"{method}_ci_high"]
    notes = []
    if partial:
        notes.append(f"partial on lr ({corr['n_groups']} levels)")
    if n < min_n:
        notes.append(f"n < {min_n}: no CI, inconclusive")
        low = high = NAN
    elif not math.isfinite(r):
        notes.append("correlation undefined (constant values)")
    label = "fisher-z 95%" + (f" ({SPEARMAN_VAR}/(n-3))" if method == "spearman" else "")
    return _row(
        "H2",
        tier,
        scope,
        method + (PARTIAL_SUFFIX if partial else ""),
        H2_SMOOTHING,
        value=r,
        ci_low=low,
        ci_high=high,
        ci_method=label if math.isfinite(low) else "none",
        threshold=threshold,
        n=n,
        verdict=verdict(low, high, threshold),
        point_passed=bool(math.isfinite(r) and r >= threshold),
        note="; ".join(notes),
        _p=(corr[f"{method}_p_pass"], corr[f"{method}_p_fail"]) if n >= min_n else (NAN, NAN),
    )


def _apply_holm(rows: list[dict], what: str) -> None:
    """Holm-adjust the secondary rows' one-sided p-values (per method) and set verdicts."""
    for method in {r["method"] for r in rows}:
        family = [r for r in rows if r["method"] == method]
        p_pass = holm([r["_p"][0] for r in family])
        p_fail = holm([r["_p"][1] for r in family])
        for r, pp, pf in zip(family, p_pass, p_fail, strict=True):
            r["verdict"] = _holm_verdict(pp, pf)
            r["passed"] = r["verdict"] == PASS
            r["p_holm"] = pp if r["verdict"] != FAIL else pf
            m = sum(math.isfinite(x) for x in p_pass)
            extra = f"Holm over {m} {what}"
            r["note"] = f"{r['note']}; {extra}" if r["note"] else extra


def _strip(rows: list[dict]) -> list[dict]:
    for r in rows:
        r.pop("_p", None)
    return rows


def _h2_exploratory_scopes(df: pd.DataFrame) -> Iterator[tuple[str, pd.Index, bool]]:
    """(scope, rows, partial on lr?): pooled (mixes variants: exploratory only), each lr,
    each variant x lr that has runs."""
    lrs = _lrs(df)
    lr = pd.Series(_floats(df["lr"]), index=df.index) if lrs else None
    yield "pooled", df.index, bool(lrs)
    for value in lrs:
        yield _lr_scope(value), df.index[lr == value], False
    for variant in _variants(df):
        for value in lrs:
            rows = df.index[(df["variant"] == variant) & (lr == value)]
            if len(rows):
                yield f"{_variant_scope(variant)}, {_lr_scope(value)}", rows, False


def h2_table(
    df: pd.DataFrame,
    threshold: float = 0.7,
    n_boot: int = N_BOOT,
    seed: int = 0,
    min_n: int = MIN_N,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H2 rows (primary, per-variant secondary, exploratory) and the excluded runs.

    `df` has run_id, variant, lr, alpha_early, best_val_ce and outcome. Diverged runs,
    runs with no finite alpha_early and runs with no finite best_val_ce are excluded, with
    reasons; runs without burn-in are kept (alpha_early does not depend on it).
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
    rows = [_h2_primary(kept, threshold, n_boot, seed, min_n)]

    def corr_of(index: pd.Index, partial: bool = False) -> dict:
        sub = kept.loc[kept.index.intersection(index)]
        groups = _floats(sub["lr"]) if partial else None
        return correlations(
            _floats(sub["alpha_early"]), _floats(sub["best_val_ce"]), groups, threshold
        )

    secondary = []
    for variant in _variants(df):
        corr = corr_of(df.index[df["variant"] == variant])
        for method in H2_METHODS:
            secondary.append(
                _h2_corr_row(
                    SECONDARY, _variant_scope(variant), method, corr, threshold, min_n, False
                )
            )
    _apply_holm(secondary, "variants")
    rows += secondary
    if _lrs(df):  # within each variant, lr partialled out: exploratory
        for variant in _variants(df):
            pcorr = corr_of(df.index[df["variant"] == variant], partial=True)
            for method in H2_METHODS:
                rows.append(
                    _h2_corr_row(
                        EXPLORATORY, _variant_scope(variant), method, pcorr, threshold, min_n, True
                    )
                )
    for scope, index, with_partial in _h2_exploratory_scopes(df):
        corr = corr_of(index)
        for method in H2_METHODS:
            rows.append(_h2_corr_row(EXPLORATORY, scope, method, corr, threshold, min_n, False))
        if with_partial:
            pcorr = corr_of(index, partial=True)
            for method in H2_METHODS:
                rows.append(_h2_corr_row(EXPLORATORY, scope, method, pcorr, threshold, min_n, True))
    return _typed_results(_strip(rows)), excluded


# --- H1 -------------------------------------------------------------------------------------


def _h1_method(rule: str, threshold_r2: float) -> str:
    return f"{H1_RULES[rule]} >= {threshold_r2:g} fraction"


def _h1_row(tier: str, scope: str, rule: str, r2, threshold_r2, threshold_frac, min_n) -> dict:
    h1 = h1_power_law_prevalence(r2, threshold_r2, threshold_frac, min_n)
    return _row(
        "H1",
        tier,
        scope,
        _h1_method(rule, threshold_r2),
        rule,
        value=h1["value"],
        ci_low=h1["ci_low"],
        ci_high=h1["ci_high"],
        ci_method="wilson 95%" if h1["n"] else "none",
        threshold=threshold_frac,
        n=h1["n"],
        verdict=h1["verdict"],
        point_passed=h1["point_passed"],
        note=h1["note"],
        _p=(h1["p_pass"], h1["p_fail"]),
    )


def h1_table(
    fits: pd.DataFrame,
    threshold_r2: float = 0.98,
    threshold_frac: float = 0.9,
    rule: str = DEFAULT_H1_RULE,
    min_n: int = MIN_N,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H1 rows (primary over all runs, per-variant secondary, other rules exploratory).

    `rule` picks the R² of the primary and secondary rows (`H1_RULES`; the pre-declared
    primary is "shape"); every other rule gets exploratory rows. Diverged runs, runs
    without burn-in and runs without a finite R² for the rule are excluded.
    """
    if rule not in H1_RULES:
        raise ValueError(f"unknown H1 smoothing rule {rule!r}; expected one of {list(H1_RULES)}")

    def kept_for(column: str):
        return _exclusions(
            fits,
            "H1",
            [
                (_is_diverged(fits["outcome"]), REASON_DIVERGED),
                (_no_burn_in(fits), REASON_NO_BURN_IN),
                (
                    ~_finite(fits[column]) if column in fits else pd.Series(True, index=fits.index),
                    _reason_no_r2(column),
                ),
            ],
        )

    column = H1_RULES[rule]
    if column not in fits:  # e.g. a table from before the column existed: no R² to count
        fits = fits.assign(**{column: NAN})
    kept, excluded = kept_for(column)
    args = (threshold_r2, threshold_frac, min_n)
    rows = [_h1_row(PRIMARY, "all runs", rule, _floats(kept[column]), *args)]
    secondary = [
        _h1_row(
            SECONDARY,
            _variant_scope(v),
            rule,
            _floats(kept.loc[kept["variant"] == v, column]),
            *args,
        )
        for v in _variants(fits)
    ]
    _apply_holm(secondary, "variants")
    rows += secondary
    for other, col in H1_RULES.items():
        if other == rule or col not in fits:
            continue
        sub, _ = kept_for(col)
        rows.append(_h1_row(EXPLORATORY, "all runs", other, _floats(sub[col]), *args))
    return _typed_results(_strip(rows)), excluded


def hypotheses_table(
    fits: pd.DataFrame,
    threshold_r2: float = 0.98,
    threshold_frac: float = 0.9,
    h2_threshold: float = 0.7,
    n_boot: int = N_BOOT,
    seed: int = 0,
    h1_rule: str = DEFAULT_H1_RULE,
    min_n: int = MIN_N,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """H1 and H2 results stacked in one typed table, plus every exclusion (by hypothesis)."""
    h1, h1_excluded = h1_table(fits, threshold_r2, threshold_frac, h1_rule, min_n)
    h2, h2_excluded = h2_table(fits, h2_threshold, n_boot=n_boot, seed=seed, min_n=min_n)
    results = pd.concat([h1, h2], ignore_index=True).astype(RESULT_DTYPES)
    excluded = pd.concat([h1_excluded, h2_excluded], ignore_index=True)
    return results, excluded[EXCLUDED_COLUMNS].astype(EXCLUDED_DTYPES)


def verdict_table(hypotheses_df: pd.DataFrame, max_rows: int = 14) -> pd.DataFrame:
    """The short table a researcher reads: primary rows first, then per-variant secondary
    rows of each hypothesis's primary method family. Secondary rows without a value are
    left out; a primary row always shows (with too few runs it is INCONCLUSIVE, value
    missing), since hiding the answer would be worse than a blank.

    Pure: the demo, `deconflow status`, the asset's metadata and the report all show it.
    """
    df = hypotheses_df
    if not len(df):
        return pd.DataFrame(columns=VERDICT_COLUMNS)
    value = pd.to_numeric(df["value"], errors="coerce")
    # a primary row always shows (its INCONCLUSIVE is the answer); others need a value
    keep = (df["tier"] == PRIMARY) | ((df["tier"] == SECONDARY) & value.notna())
    # secondary H2: the Pearson rows (the primary's method); Spearman stays in DuckDB
    keep &= ~((df["hypothesis"] == "H2") & (df["tier"] == SECONDARY) & (df["method"] != "pearson"))
    out = df.loc[keep, VERDICT_COLUMNS].copy()
    out["_t"] = out["tier"].map(TIER_ORDER)
    out = out.sort_values(["_t", "hypothesis", "scope"], kind="stable").drop(columns="_t")
    return out.head(max_rows).reset_index(drop=True)


def format_verdicts(short: pd.DataFrame) -> str:
    """`verdict_table` as aligned text, one line per row (the demo and `deconflow status`):
    value and CI to 3 decimals, the threshold with its direction."""
    if not len(short):
        return "(no hypothesis rows yet)"

    def num(v) -> str:
        v = pd.to_numeric(v, errors="coerce")
        return "-" if pd.isna(v) else f"{float(v):.3f}"

    out = pd.DataFrame(
        {
            "H": short["hypothesis"],
            "tier": short["tier"],
            "scope": short["scope"],
            "method": short["method"].str.replace(
                H2_PRIMARY_METHOD, "pearson, Fisher-z combined", regex=False
            ),
            "value": [num(v) for v in short["value"]],
            "95% CI": [
                f"[{num(lo)}, {num(hi)}]"
                for lo, hi in zip(short["ci_low"], short["ci_high"], strict=True)
            ],
            "threshold": [
                f"{'>' if h == 'H1' else '>='} {float(t):g}"
                for h, t in zip(short["hypothesis"], short["threshold"], strict=True)
            ],
            "n": short["n"],
            "verdict": short["verdict"],
        }
    )
    return out.to_string(index=False)
