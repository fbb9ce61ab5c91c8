"""Analysis library against known truth: exact fits, hand-built series, known matrices."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from deconflow.analysis import (
    FIT_KEYS,
    alpha_early,
    alpha_full,
    best_val,
    burn_in,
    correlations,
    fit_power_law,
    fit_run,
    h1_power_law_prevalence,
    h2_table,
    hypotheses_table,
    linear_slope,
    per_epoch_mean,
)
from deconflow.analysis.hypotheses import H2_PRIMARY_METHOD
from deconflow.training.curvature import hutchinson_trace, model_hvp, power_iteration
from deconflow.training.spectra import ewma, gradient_variance, psd_tail_ratio, residual_power

# --- fits -------------------------------------------------------------------------------


def test_exact_power_law_is_recovered():
    t = np.arange(1, 1001, dtype=float)
    fit = fit_power_law(t, 3.0 * t**-0.5)
    assert fit.exponent == pytest.approx(-0.5, abs=1e-9)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log(3.0), abs=1e-9)
    assert fit.n == 1000


def test_power_law_drops_unloggable_points_and_needs_three():
    t = np.array([0.0, 1.0, 2.0, 4.0, np.nan, 8.0])
    with np.errstate(divide="ignore"):
        fit = fit_power_law(t, 2.0 * t**-1.0)
    assert fit.n == 4
    assert fit.exponent == pytest.approx(-1.0)
    few = fit_power_law([1.0, 2.0, -1.0], [1.0, 0.5, 1.0])
    assert few.n == 2 and math.isnan(few.exponent) and math.isnan(few.r_squared)


def test_noisy_power_law_has_high_but_imperfect_r2():
    rng = np.random.default_rng(0)
    t = np.arange(1, 2001, dtype=float)
    loss = 3.0 * t**-0.5 * np.exp(rng.normal(0, 0.1, t.size))
    fit = fit_power_law(t, loss)
    assert 0.9 < fit.r_squared < 1.0
    assert fit.exponent == pytest.approx(-0.5, abs=0.02)


def test_burn_in_finds_first_point_at_or_below_threshold():
    epochs = np.array([0.25, 0.5, 0.75, 1.0, 1.25])
    loss = np.array([2.3, 1.5, np.nan, 1.0, 0.8])
    assert burn_in(epochs, loss) == (1.25, pytest.approx(0.9))  # smoothed: one-epoch mean
    assert burn_in(epochs, loss + 5.0) is None


def test_linear_slope_and_per_epoch_means():
    assert linear_slope([1, 2, 3, np.nan], [2, 4, 6, 100]) == pytest.approx(2.0)
    assert math.isnan(linear_slope([1], [1]))
    epochs, means = per_epoch_mean([1, 1, 2, 2, 3], [1.0, 3.0, 4.0, np.nan, 5.0])
    np.testing.assert_array_equal(epochs, [1, 2, 3])
    np.testing.assert_allclose(means, [2.0, 4.0, 5.0])


def test_alpha_early_and_full_on_known_slopes():
    epochs = np.arange(1, 51, dtype=float)
    means = np.where(epochs <= 15, 5.0 - 0.2 * epochs, 2.0 - 0.01 * (epochs - 15))
    means[:4] = 99.0  # epochs 1-4 are outside the early window
    assert alpha_early(epochs, means) == pytest.approx(-0.2)
    assert math.isnan(alpha_early(epochs[:12], means[:12]))  # run shorter than 15 epochs
    # alpha_full from batches: 4 steps per epoch, each epoch's batches at its mean
    step = np.arange(1, 4 * 50 + 1, dtype=float)
    loss = np.repeat(means, 4)
    assert alpha_full(step, step / 4, loss, burn_in_step=4 * 15 + 1) == pytest.approx(-0.01)
    assert math.isnan(alpha_full(step, step / 4, loss, None))
    assert math.isnan(alpha_full(step, step / 4, loss, float("nan")))


def test_best_val_ignores_nan():
    assert best_val([1, 2, 3, 4], [2.0, np.nan, 0.5, 0.7]) == (0.5, 3.0)
    assert all(math.isnan(v) for v in best_val([1, 2], [np.nan, np.inf]))


def _synthetic_run(steps_per_epoch: int = 20, n_epochs: int = 30):
    """Linear fall to 1.0 over the first 3 epochs, then L = 50 t^-0.6 (continuous)."""
    step = np.arange(1, steps_per_epoch * n_epochs + 1)
    epoch = step / steps_per_epoch
    knee_step = 3 * steps_per_epoch
    a = 1.0 * knee_step**0.6
    loss = np.where(step < knee_step, 3.0 - 2.0 * (step - 1) / (knee_step - 1), a * step**-0.6)
    loss[knee_step - 2] = 1.01  # stays above 1 until the knee
    batch = pd.DataFrame({"step": step, "epoch": epoch, "loss": loss})
    val_epoch = np.arange(1, 4 * n_epochs + 1) / 4
    val_loss = 2.0 - 0.01 * val_epoch
    val_loss[-1] = np.nan
    val = pd.DataFrame({"epoch": val_epoch, "val_loss": val_loss})
    return batch, val, knee_step, a


def test_fit_run_on_synthetic_power_law_after_burn_in():
    batch, val, knee_step, a = _synthetic_run()
    out = fit_run(batch, val)
    assert out["knee_epoch"] >= 3.0  # the smoothed curve crosses at or after the raw one
    assert out["burn_in_loss"] <= 1.0
    assert out["exponent"] == pytest.approx(-0.6, abs=1e-9)
    assert out["intercept"] == pytest.approx(math.log(a), abs=1e-9)
    assert out["r_squared"] == pytest.approx(1.0, abs=1e-12)
    assert out["n_points"] == len(batch) - out["burn_in_step"] + 1
    # per-epoch means of a power law; compare with a direct computation
    idx = np.ceil(batch["epoch"].to_numpy() - 1e-9)
    means = batch.groupby(idx)["loss"].mean()
    early = means.loc[6:15]  # the plan's 5..15, 0-based end-exclusive
    expected = np.polyfit(early.index.to_numpy(float), early.to_numpy(), 1)[0]
    assert out["alpha_early"] == pytest.approx(expected)
    assert out["alpha_early"] < 0
    assert out["best_val_ce"] == pytest.approx(2.0 - 0.01 * 29.75)
    assert out["best_val_epoch"] == pytest.approx(29.75)


def test_fit_run_without_burn_in_and_with_max_epoch():
    batch, val, _, _ = _synthetic_run()
    batch = batch.assign(loss=batch["loss"] + 10.0)
    out = fit_run(batch, val, max_epoch=20)
    assert math.isnan(out["knee_epoch"]) and math.isnan(out["burn_in_loss"])
    assert math.isnan(out["alpha_full"])
    # no burn-in, no power law (the plan fits only after burn-in)
    assert math.isnan(out["r_squared"]) and math.isnan(out["exponent"])
    assert out["n_points"] == 0
    assert math.isfinite(out["alpha_early"])
    assert out["best_val_epoch"] == pytest.approx(20.0)
    assert set(out) == set(FIT_KEYS)


# --- curvature --------------------------------------------------------------------------


def _quadratic(eigs: list[float], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    w = torch.randn(len(eigs), generator=g, dtype=torch.float64, requires_grad=True)
    return a, w


def test_power_iteration_and_hutchinson_on_known_quadratic():
    eigs = [10.0, 5.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0]
    a, w = _quadratic(eigs)
    hvp = model_hvp(lambda: 0.5 * w @ a @ w, [w])
    v = torch.randn(len(eigs), dtype=torch.float64)
    torch.testing.assert_close(hvp(v), a @ v)
    g = torch.Generator().manual_seed(1)
    assert power_iteration(hvp, w.detach(), iters=30, generator=g) == pytest.approx(10.0, rel=0.05)
    trace = hutchinson_trace(hvp, w.detach(), samples=200, generator=g)
    assert trace == pytest.approx(sum(eigs), rel=0.05)


def test_model_hvp_over_several_parameter_tensors():
    a, w = _quadratic([3.0, 2.0, 1.0, 1.0])
    w1 = w.detach()[:2].clone().requires_grad_(True)
    w2 = w.detach()[2:].clone().requires_grad_(True)
    hvp = model_hvp(lambda: 0.5 * torch.cat([w1, w2]) @ a @ torch.cat([w1, w2]), [w1, w2])
    v = torch.arange(4, dtype=torch.float64)
    torch.testing.assert_close(hvp(v), a @ v)


# --- spectra ----------------------------------------------------------------------------


def test_psd_tail_ratio_separates_white_noise_from_slow_sinusoid():
    rng = np.random.default_rng(0)
    assert psd_tail_ratio(rng.normal(size=4096)) == pytest.approx(0.5, abs=0.05)
    t = np.arange(4096)
    slow = np.sin(2 * np.pi * t / 200.0) + 1e-3 * rng.normal(size=t.size)
    assert psd_tail_ratio(slow) < 0.05
    assert math.isnan(psd_tail_ratio(np.linspace(3.0, 1.0, 100)))  # no fluctuation at all


def test_ewma_and_residual_power():
    np.testing.assert_allclose(ewma([1.0, 3.0, 3.0], 0.5), [1.0, 2.0, 2.5])
    np.testing.assert_allclose(ewma([2.0, 2.0, 2.0, 2.0], 0.3), [2.0] * 4)
    assert residual_power(np.full(100, 4.2)) == pytest.approx(0.0, abs=1e-24)
    x = [0.0, 2.0]  # ewma(0.5) = [0, 1] -> residuals [0, 1]
    assert residual_power(x, alpha=0.5) == pytest.approx(0.5)


def test_gradient_variance_matches_numpy():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(8, 50)) * np.linspace(0.1, 2.0, 50)
    expected = np.var(grads, axis=0, ddof=1).mean()
    assert gradient_variance(torch.from_numpy(grads).float()) == pytest.approx(expected, rel=1e-5)
    assert math.isnan(gradient_variance(torch.zeros(1, 5)))


# --- hypotheses -------------------------------------------------------------------------


def test_correlations_on_perfect_linear_data():
    x = np.arange(20, dtype=float)
    out = correlations(x, 3.0 * x - 1.0)
    for key in ("pearson", "spearman", "pearson_ci_low", "spearman_ci_high"):
        assert out[key] == pytest.approx(1.0)
    assert out["n"] == 20
    short = correlations([1.0, 2.0, np.nan], [1.0, 2.0, 3.0])
    assert short["n"] == 2 and math.isnan(short["pearson"])


def test_correlations_spearman_is_rank_based():
    x = np.arange(1, 30, dtype=float)
    out = correlations(x, np.exp(x))
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] < 0.9


def test_h1_fraction_on_known_list():
    r2 = [0.99, 0.985, 0.97, 0.999, np.nan]
    out = h1_power_law_prevalence(r2)
    assert out["value"] == pytest.approx(0.75)
    assert out["n"] == 4 and out["passed"] is False and out["threshold"] == 0.9
    ten = h1_power_law_prevalence([0.99] * 10)  # 100% of 10: Wilson lower bound 0.72
    assert ten["point_passed"] is True and ten["passed"] is False
    assert h1_power_law_prevalence([0.99] * 40)["passed"] is True  # lower bound 0.912


def _fits_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for variant in ("vanilla", "deconv"):
        for i in range(6):
            alpha = -0.1 * (i + 1)
            rows.append(
                {
                    "run_id": f"{variant}-{i}",
                    "variant": variant,
                    "alpha_early": alpha,
                    "best_val_ce": 1.0 + alpha + 0.01 * rng.normal(),
                    "r_squared": 0.99 if i else 0.9,
                    "outcome": "completed",
                    "lr": 0.1 if i % 2 else 0.2,
                    "knee_epoch": 2.0,
                }
            )
    df = pd.DataFrame(rows)
    df.loc[df["run_id"] == "vanilla-5", ["outcome", "alpha_early", "r_squared"]] = [
        "diverged",
        np.nan,
        np.nan,
    ]
    df.loc[df["run_id"] == "deconv-4", "alpha_early"] = np.nan
    df.loc[df["run_id"] == "deconv-3", "best_val_ce"] = np.nan
    return df


def test_h2_table_excludes_runs_with_reasons_and_counts():
    results, excluded = h2_table(_fits_table(), n_boot=200)
    reasons = dict(zip(excluded["run_id"], excluded["reason"], strict=True))
    assert reasons == {
        "vanilla-5": "diverged",
        "deconv-4": "alpha_early not finite (run shorter than its alpha_early window?)",
        "deconv-3": "no finite validation loss",
    }
    both = ["pearson", "spearman"]
    partial = ["pearson_partial_lr", "spearman_partial_lr"]
    # primary (within variant, combined), per variant (secondary), then exploratory: per
    # variant partial on lr, pooled (plain and partial), per lr, per variant x lr
    expected = [("within variant, combined (2 variants)", H2_PRIMARY_METHOD)]
    expected += [(f"variant={v}", m) for v in ("deconv", "vanilla") for m in both]
    expected += [(f"variant={v}", m) for v in ("deconv", "vanilla") for m in partial]
    expected += [("pooled", m) for m in both + partial]
    expected += [(f"lr={lr}", m) for lr in ("0.1", "0.2") for m in both]
    expected += [
        (f"variant={v}, lr={lr}", m)
        for v in ("deconv", "vanilla")
        for lr in ("0.1", "0.2")
        for m in both
    ]
    assert list(zip(results["scope"], results["method"], strict=True)) == expected
    n = dict(zip(results["scope"], results["n"], strict=False))
    assert n["pooled"] == 9 and n["variant=deconv"] == 4 and n["variant=vanilla"] == 5
    assert n["lr=0.1"] + n["lr=0.2"] == 9
    # near-perfect correlations, but n < 8 per variant: the point estimate passes, the
    # verdict does not
    per_variant = results[results["tier"] == "secondary"]
    assert len(per_variant) == 4
    assert per_variant["point_passed"].all() and not per_variant["passed"].any()
    assert (per_variant["verdict"] == "INCONCLUSIVE").all()
    assert per_variant["ci_low"].isna().all()
    pooled = results[(results["scope"] == "pooled") & results["method"].isin(both)]
    assert (pooled["ci_low"] <= pooled["value"]).all()
    assert (pooled["value"] <= pooled["ci_high"] + 1e-12).all()


def test_hypotheses_table_stacks_h1_and_h2():
    results, excluded = hypotheses_table(_fits_table(), n_boot=100, h1_rule="raw")
    h1 = results[results["hypothesis"] == "H1"].set_index("scope")
    assert list(h1.index) == ["all runs", "variant=deconv", "variant=vanilla"]
    assert h1.loc["all runs", "n"] == 11 and h1.loc["all runs", "primary"]
    assert h1.loc["all runs", "value"] == pytest.approx(9 / 11)
    assert h1.loc["variant=vanilla", "value"] == pytest.approx(4 / 5)
    assert not h1["passed"].any()
    assert (h1["method"] == "r_squared >= 0.98 fraction").all() and (h1["threshold"] == 0.9).all()
    assert (h1["smoothing"] == "raw").all()
    assert len(results) == 3 + 1 + 2 * 2 + 2 * 2 + 4 + 2 * 2 + 4 * 2
    assert results.groupby("hypothesis")["primary"].sum().to_dict() == {"H1": 1, "H2": 1}
    h1_excluded = excluded[excluded["hypothesis"] == "H1"]
    assert list(h1_excluded["run_id"]) == ["vanilla-5"]
    assert list(h1_excluded["reason"]) == ["diverged"]
    assert results["passed"].dtype == bool and results["point_passed"].dtype == bool
