"""Each analysis definition pinned against hand-computed truth on small synthetic curves:
a power law with known exponent and known i.i.d. noise, a curve that never burns in, a
knee in the middle of an epoch; CI clamping, CI-based verdicts and H2 within each lr."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from deconflow.analysis import (
    FIT_KEYS,
    alpha_full,
    correlations,
    epoch_means,
    fit_run,
    h1_power_law_prevalence,
    hypotheses_table,
    linear_slope,
    noise_variance,
    r2_noise_limited,
    wilson_interval,
)
from deconflow.analysis.hypotheses import REASON_NO_BURN_IN, h1_table, h2_table

# --- curves ------------------------------------------------------------------------------


def _batch(step: np.ndarray, loss: np.ndarray, spe: int) -> pd.DataFrame:
    return pd.DataFrame({"step": step, "epoch": step / spe, "loss": loss})


def _val(epochs: int) -> pd.DataFrame:
    e = np.arange(1, 4 * epochs + 1) / 4
    return pd.DataFrame({"epoch": e, "val_loss": 1.0 + 1.0 / e})


SIGMA = 0.1  # noise of log L


def _noisy_power_law(seed: int = 0):
    """Steps 1-99 at 5.0 (before burn-in), then L = 8 t^-0.5 exp(eps), eps ~ N(0, 0.1²)
    i.i.d., from step 100 (where L = 0.8 exactly: burn-in) to step 5099; 100 steps/epoch."""
    rng = np.random.default_rng(seed)
    step = np.arange(1, 5100, dtype=float)
    eps = rng.normal(0.0, SIGMA, step.size)
    eps[99] = 0.0
    loss = np.where(step < 100, 5.0, 8.0 * step**-0.5 * np.exp(eps))
    return _batch(step, loss, 100), eps


def _knee_mid_epoch():
    """10 steps/epoch; CE 3.0 for steps 1-14, then linear 1.0 - 0.001 (t - 15) from step 15
    (epoch 1.5, the middle of epoch 2) to step 60."""
    step = np.arange(1, 61, dtype=float)
    loss = np.where(step < 15, 3.0, 1.0 - 0.001 * (step - 15))
    return _batch(step, loss, 10)


# --- noise ceiling -------------------------------------------------------------------------


def test_noise_variance_by_hand():
    # second differences of [0, 1, 0, 1, 0]: -2, 2, -2 -> 12 / (6 * 3) = 2/3
    assert noise_variance([0.0, 1.0, 0.0, 1.0, 0.0]) == pytest.approx(2 / 3, abs=1e-15)
    # a straight line has no scatter: the trend cancels exactly
    assert noise_variance(np.linspace(3.0, -1.0, 50)) == pytest.approx(0.0, abs=1e-24)
    assert math.isnan(noise_variance([1.0, 2.0]))


def test_noise_ceiling_by_hand():
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.0])  # Var (divisor n) = 0.24
    ceiling, sigma2 = r2_noise_limited(y)
    assert sigma2 == pytest.approx(2 / 3)
    assert ceiling == 0.0  # 1 - (2/3)/0.24 < 0: clipped, all of the variance is scatter
    ceiling, sigma2 = r2_noise_limited(np.linspace(1.0, 0.0, 20))
    assert ceiling == pytest.approx(1.0) and sigma2 == pytest.approx(0.0, abs=1e-24)


def test_noisy_power_law_recovers_exponent_noise_and_ceiling():
    batch, eps = _noisy_power_law()
    out = fit_run(batch, _val(51))
    assert set(out) == set(FIT_KEYS)
    # the smoothed knee (centred mean over one epoch, 101 batches) crosses 1.0 once the
    # window holds at most 4 of the 5.0-plateau batches: step 143, not the first batch (100)
    k = int(out["burn_in_step"])
    assert k == 143 and out["knee_epoch"] == pytest.approx(1.43)
    assert out["burn_in_loss"] <= 1.0
    assert out["n_points"] == 5100 - k and out["n_dropped_nonfinite"] == 0
    assert out["exponent"] == pytest.approx(-0.5, abs=0.01)
    assert out["intercept"] == pytest.approx(math.log(8.0), abs=0.08)
    # the estimator finds the known noise variance
    assert out["noise_var"] == pytest.approx(SIGMA**2, rel=0.1)
    # and the ceiling it implies: 1 - sigma² / Var(log L) over the fitted points
    y = np.log(batch["loss"].to_numpy()[k - 1 :])
    assert out["r_squared_noise_limited"] == pytest.approx(1 - SIGMA**2 / np.var(y), abs=0.01)
    # the true curve's own R² is at the ceiling; so is the fit's (it is the right model)
    true_r2 = 1 - np.sum(eps[k - 1 :] ** 2) / np.sum((y - y.mean()) ** 2)
    assert out["r_squared"] == pytest.approx(true_r2, abs=0.005)
    assert out["r_squared"] == pytest.approx(out["r_squared_noise_limited"], abs=0.01)
    assert out["r_squared"] < 0.98  # the plan's raw rule fails on noise alone
    assert out["r_squared_shape"] == pytest.approx(1.0, abs=0.01)  # the shape rule does not
    # per-epoch means average the noise away: same exponent, R² near 1
    assert out["exponent_epoch_mean"] == pytest.approx(-0.5, abs=0.01)
    assert out["r_squared_epoch_mean"] > 0.99
    # epoch 2 is partial from the knee, epochs 3..50 whole, 51 partial
    assert out["n_epoch_means"] == 50


# --- no burn-in ----------------------------------------------------------------------------


def test_curve_that_never_burns_in_has_no_power_law_fit():
    step = np.arange(1, 201, dtype=float)
    batch = _batch(step, 1.5 + 2.0 * step**-0.3, 10)  # always above 1.0
    out = fit_run(batch, _val(20))
    for k in (
        "knee_epoch",
        "burn_in_step",
        "burn_in_loss",
        "r_squared",
        "r_squared_noise_limited",
        "noise_var",
        "exponent",
        "intercept",
        "r_squared_epoch_mean",
        "exponent_epoch_mean",
        "alpha_full",
    ):
        assert math.isnan(out[k]), k
    assert out["n_points"] == 0 and out["n_epoch_means"] == 0
    means = batch.groupby(np.ceil(batch["epoch"] - 1e-9))["loss"].mean()
    # the plan's 5..15, 0-based end-exclusive: epochs 6..15 counted from 1
    assert out["alpha_early"] == pytest.approx(linear_slope(means.index[5:15], means.iloc[5:15]))
    assert out["best_val_ce"] == pytest.approx(1.05)


# --- knee mid-epoch: alpha_full from burn-in ------------------------------------------------


def test_alpha_full_from_burn_in_with_knee_mid_epoch():
    batch = _knee_mid_epoch()
    step, epoch, loss = (batch[c].to_numpy() for c in ("step", "epoch", "loss"))
    means = epoch_means(step, epoch, loss, from_step=15)
    # the knee's epoch (2) averages only steps 15..20: mean step 17.5, loss 1 - 0.001 * 2.5
    np.testing.assert_array_equal(means.epoch, [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(means.count, [6, 10, 10, 10, 10])
    assert means.mean_step[0] == pytest.approx(17.5) and means.mean_epoch[0] == pytest.approx(1.75)
    assert means.loss[0] == pytest.approx(0.9975)
    # the loss falls 0.001 per step = 0.01 per epoch from burn-in on: alpha_full is exactly that
    assert alpha_full(step, epoch, loss, 15) == pytest.approx(-0.01, abs=1e-12)
    out = fit_run(batch, _val(6))
    # smoothed knee: the 11-batch centred mean first leaves out every CE-3.0 batch at step 20
    assert out["knee_epoch"] == pytest.approx(2.0) and out["burn_in_step"] == 20
    assert out["alpha_full"] == pytest.approx(-0.01, abs=1e-12)
    assert not out["alpha_full_few_points"]  # epochs 2..6: exactly the minimum of 5
    # whole epochs >= the fractional knee (the old rule) mix steps 11..14 (CE 3.0) into
    # epoch 2 and get another slope
    whole = batch.groupby(np.ceil(batch["epoch"] - 1e-9))["loss"].mean()
    old = linear_slope(whole.index[whole.index >= 1.5], whole[whole.index >= 1.5])
    assert abs(old - (-0.01)) > 0.1
    assert math.isnan(alpha_full(step, epoch, loss, None))


def test_alpha_early_uses_the_window_it_is_given():
    batch = _knee_mid_epoch()
    out = fit_run(batch, _val(6), alpha_early_epochs=(3, 5))
    # epochs 3, 4, 5 are whole and linear: slope -0.01 per epoch
    assert out["alpha_early"] == pytest.approx(-0.01, abs=1e-12)
    assert math.isnan(fit_run(batch, _val(6), alpha_early_epochs=(3, 7))["alpha_early"])


# --- CIs and verdicts ----------------------------------------------------------------------


def test_wilson_interval_by_hand_and_clamped():
    low, high = wilson_interval(9, 10)  # textbook: [0.596, 0.982]
    assert low == pytest.approx(0.59585, abs=1e-4) and high == pytest.approx(0.98212, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / 13.8415, abs=1e-4)
    for n in range(1, 60):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_h1_passes_only_when_the_wilson_bound_clears_90_percent():
    # all good: 34 runs give a lower bound 34/(34 + z²) = 0.8985, 35 give 0.9011
    at_34 = h1_power_law_prevalence([0.99] * 34)
    at_35 = h1_power_law_prevalence([0.99] * 35)
    assert at_34["point_passed"] and at_34["verdict"] == "INCONCLUSIVE"
    assert at_34["ci_low"] == pytest.approx(34 / (34 + 1.959963984540054**2))
    assert at_35["point_passed"] and at_35["passed"] and at_35["verdict"] == "PASS"
    few = h1_power_law_prevalence([0.99] * 5)
    assert few["point_passed"] and few["verdict"] == "INCONCLUSIVE" and "n < 8" in few["note"]
    none = h1_power_law_prevalence([0.5] * 10)
    assert none["ci_low"] == 0.0 and not none["point_passed"] and none["verdict"] == "FAIL"


def _fits(n: int, **cols) -> pd.DataFrame:
    base = {
        "run_id": [f"r{i}" for i in range(n)],
        "variant": "base",
        "lr": 0.1,
        "outcome": "completed",
        "knee_epoch": 1.0,
        "r_squared": 0.99,
        "r_squared_epoch_mean": 0.99,
        "r_squared_shape": 0.99,
        "alpha_early": np.linspace(-0.3, -0.1, n),
        "best_val_ce": np.linspace(0.5, 0.9, n),
    }
    base.update(cols)
    return pd.DataFrame(base)


def test_h1_smoothing_rule_is_declared_and_named():
    fits = _fits(40, r_squared=0.9, r_squared_epoch_mean=0.99)
    raw, _ = h1_table(fits, rule="raw")
    smooth, _ = h1_table(fits, rule="epoch_mean")
    assert raw.loc[0, "smoothing"] == "raw" and smooth.loc[0, "smoothing"] == "epoch_mean"
    assert raw.loc[0, "primary"] and smooth.loc[0, "primary"]
    default, _ = h1_table(fits)  # the pre-declared primary: the shape rule
    assert default.loc[0, "smoothing"] == "shape" and default.loc[0, "primary"]
    assert set(default.loc[default["tier"] == "exploratory", "smoothing"]) == {"raw", "epoch_mean"}
    assert raw.loc[0, "value"] == 0.0 and smooth.loc[0, "value"] == 1.0
    assert smooth.loc[0, "passed"] and not raw.loc[0, "passed"]
    with pytest.raises(ValueError, match="smoothing rule"):
        h1_table(fits, rule="ema")


def test_runs_without_burn_in_are_excluded_from_h1_and_h2_with_the_reason():
    fits = _fits(10)
    fits.loc[3, ["knee_epoch", "r_squared"]] = [np.nan, 0.55]  # the old fit on all points
    results, excluded = hypotheses_table(fits, n_boot=50)
    # H2 keeps it: alpha_early is over fixed epochs (SPEC section 4), not from burn-in
    assert excluded.to_dict("records") == [
        {"hypothesis": "H1", "run_id": "r3", "reason": REASON_NO_BURN_IN},
    ]
    assert REASON_NO_BURN_IN == "no burn-in: smoothed train CE never <= 1.0"
    assert (results.loc[results["hypothesis"] == "H1", "n"] == 9).all()
    assert (results.loc[results["hypothesis"] == "H2", "n"] == 10).all()


def test_h2_degenerate_cis_do_not_pass():
    x = np.linspace(-0.3, -0.1, 6)
    small, _ = h2_table(_fits(6, alpha_early=x, best_val_ce=2 * x + 1), n_boot=200)
    row = small.iloc[0]
    assert row["value"] == pytest.approx(1.0) and row["point_passed"] and not row["passed"]
    assert pd.isna(row["ci_low"]) and "n < 8" in row["note"]
    x = np.linspace(-0.3, -0.1, 20)
    perfect, _ = h2_table(_fits(20, alpha_early=x, best_val_ce=2 * x + 1), n_boot=200)
    row = perfect.iloc[0]  # the primary: every resample of a perfect line gives r = 1
    assert pd.isna(row["ci_low"]) and row["verdict"] == "INCONCLUSIVE"
    assert row["point_passed"] and not row["passed"] and "zero-width" in row["note"]


def test_h2_passes_on_the_ci_and_reports_the_point_verdict():
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    strong, _ = h2_table(_fits(60, alpha_early=x, best_val_ce=x + 0.2 * rng.normal(size=60)))
    weak, _ = h2_table(_fits(12, alpha_early=x[:12], best_val_ce=x[:12] + rng.normal(size=12)))
    s, w = strong.iloc[0], weak.iloc[0]
    assert s["ci_low"] >= 0.7 and s["passed"] and s["point_passed"]
    assert "bootstrap BCa" in s["ci_method"] and s["primary"]
    assert w["passed"] == (w["ci_low"] >= 0.7)
    assert w["point_passed"] == (w["value"] >= 0.7)
    for r in pd.concat([strong, weak]).itertuples():
        assert -1.0 <= r.ci_low <= r.value <= r.ci_high <= 1.0


def _confounded() -> pd.DataFrame:
    """Simpson's paradox: across lrs, slower early fall goes with higher validation CE;
    within each lr, the opposite."""
    rng = np.random.default_rng(7)
    rows = []
    for i, lr in enumerate([0.05, 0.1, 0.2]):
        u = rng.normal(0.0, 0.02, 10)
        for j in range(10):
            rows.append(
                {
                    "run_id": f"base-{lr}-{j}",
                    "variant": "base",
                    "lr": lr,
                    "outcome": "completed",
                    "knee_epoch": 1.0,
                    "r_squared": 0.99,
                    "alpha_early": -0.3 + 0.1 * i + u[j],
                    "best_val_ce": 0.5 + 0.3 * i - 2.0 * u[j] + 0.001 * rng.normal(),
                }
            )
    return pd.DataFrame(rows)


def test_h2_within_each_lr_and_partial_on_lr_show_confounding():
    df = _confounded()
    results, _ = h2_table(df, n_boot=300)
    r = results.set_index(["scope", "method"])
    assert r.loc[("pooled", "pearson"), "value"] > 0.7  # confounded by lr
    assert r.loc[("pooled", "pearson"), "n"] == 30
    for lr in ("0.05", "0.1", "0.2"):
        for scope in (f"lr={lr}", f"variant=base, lr={lr}"):
            assert r.loc[(scope, "pearson"), "n"] == 10
            assert r.loc[(scope, "pearson"), "value"] < -0.9
    sub = df[df["lr"] == 0.1]
    assert r.loc[("lr=0.1", "pearson"), "value"] == pytest.approx(
        np.corrcoef(sub["alpha_early"], sub["best_val_ce"])[0, 1], abs=1e-12
    )
    # partial on lr: correlate the values centred within each lr
    centred = df.groupby("lr")[["alpha_early", "best_val_ce"]].transform(lambda s: s - s.mean())
    hand = np.corrcoef(centred["alpha_early"], centred["best_val_ce"])[0, 1]
    partial = r.loc[("pooled", "pearson_partial_lr")]
    assert partial["value"] == pytest.approx(hand, abs=1e-12) and partial["value"] < -0.9
    assert not partial["passed"] and "partial on lr (3 levels)" in partial["note"]
    assert partial["tier"] == "exploratory" and partial["verdict"] == "FAIL"
    ranks = df[["alpha_early", "best_val_ce"]].rank().assign(lr=df["lr"])
    rc = ranks.groupby("lr")[["alpha_early", "best_val_ce"]].transform(lambda s: s - s.mean())
    assert r.loc[("pooled", "spearman_partial_lr"), "value"] == pytest.approx(
        np.corrcoef(rc["alpha_early"], rc["best_val_ce"])[0, 1], abs=1e-12
    )
    assert r.loc[("variant=base", "pearson_partial_lr"), "value"] == pytest.approx(hand)


def test_partial_correlation_fisher_ci_brackets_the_value():
    df = _confounded()
    out = correlations(df["alpha_early"], df["best_val_ce"], groups=df["lr"])
    assert out["n_groups"] == 3 and out["n_eff"] == 30 - 3 - 2
    assert out["pearson_ci_low"] <= out["pearson"] <= out["pearson_ci_high"] < 0


def test_hypotheses_table_is_typed():
    results, excluded = hypotheses_table(_confounded(), n_boot=50)
    assert str(results["value"].dtype) == "Float64" and str(results["n"].dtype) == "Int64"
    assert results["passed"].dtype == bool and results["point_passed"].dtype == bool
    assert results["primary"].dtype == bool
    for c in ("hypothesis", "tier", "verdict", "scope", "method", "smoothing", "ci_method", "note"):
        assert str(results[c].dtype) == "string", c
    assert all(str(t) == "string" for t in excluded.dtypes)
