"""Quality gates, typed tables and the export on hand-written run folders (no training).

A sweep of demo-profile runs in which single runs carry one known defect each: the gates
must name exactly those runs with their row counts; a clean sweep must be GO.
"""

from __future__ import annotations

import json
import math

import duckdb
import numpy as np
import pandas as pd
import pytest

from deconflow.analysis import hypotheses_table
from deconflow.analysis.hypotheses import REASON_NO_BURN_IN
from deconflow.parquet_io import read_parquet, write_parquet
from deconflow.profiles import get_profile
from deconflow.protocol import family_file
from deconflow.sweep import Cell, grid_from_dict
from deconflow.warehouse import database as database_mod
from deconflow.warehouse import export as export_mod
from deconflow.warehouse import gates as gates_mod
from deconflow.warehouse import publish as publish_mod
from deconflow.warehouse import tables as tables_mod
from tests.synthetic_runs import write_run

GRID = grid_from_dict(
    {
        "variants": ["base", "bn_off", "narrow", "adamw"],
        "lr": [0.05, 0.1, 0.2],
        "weight_decay": [0.001],
        "seed": [0, 1],
    }
)


def cell(variant: str, lr: float, seed: int = 0) -> Cell:
    return Cell(variant, lr, 0.001, seed)


EARLY, EARLY2 = cell("base", 0.1), cell("base", 0.2)
LATE = cell("bn_off", 0.1)
NAN_CURVATURE = cell("narrow", 0.1)
FREQUENCY = cell("narrow", 0.2)
OWN_SUMMARY = cell("adamw", 0.05)
NO_BURN_IN = cell("adamw", 0.1)
LR_ABOVE_PEAK = cell("adamw", 0.2)
NOISE_AND_NORM = cell("bn_off", 0.2)
DIVERGED_RUN = cell("bn_off", 0.05)
ACCURACY = cell("base", 0.2, seed=1)
CLEAN = cell("base", 0.05)


def _set(frames, family: str, step: int, column: str, value: float) -> None:
    df = frames[family]
    assert (df["step"] == step).sum() == 1, (family, step)
    df.loc[df["step"] == step, column] = value


def _own_hessian_every(frames, summary) -> None:
    """Trained with hessian_every=60 and says so itself: consistent with its own summary,
    not with the demo profile (40)."""
    df = frames["curvature_metrics"]
    frames["curvature_metrics"] = pd.concat(
        [df.iloc[:2].assign(step=[60, 120], epoch=[60 / 11, 120 / 11])], ignore_index=True
    )
    summary["hessian_every"] = 60


EDITS = {
    EARLY: lambda f, s: (
        _set(f, "val_metrics", 6, "val_loss", 500.0),
        _set(f, "val_metrics", 14, "val_loss", 37.0),
    ),
    EARLY2: lambda f, s: _set(f, "val_metrics", 22, "val_loss", 12.0),
    LATE: lambda f, s: _set(f, "val_metrics", 110, "val_loss", 50.0),
    NAN_CURVATURE: lambda f, s: _set(f, "curvature_metrics", 80, "lambda_max", np.nan),
    FREQUENCY: lambda f, s: (
        f.__setitem__("val_metrics", f["val_metrics"][f["val_metrics"]["step"] != 14]),
        f.__setitem__(
            "curvature_metrics",
            pd.concat([f["curvature_metrics"], f["curvature_metrics"].iloc[:1].assign(step=50)]),
        ),
    ),
    OWN_SUMMARY: _own_hessian_every,
    LR_ABOVE_PEAK: lambda f, s: (
        _set(f, "batch_metrics", 100, "lr", 0.5),
        _set(f, "batch_metrics", 101, "lr", 0.5),
    ),
    NOISE_AND_NORM: lambda f, s: (
        _set(f, "noise_metrics", 44, "psd_tail_ratio", 1.5),
        _set(f, "val_metrics", 33, "grad_norm", -1.0),
    ),
    ACCURACY: lambda f, s: [_set(f, "batch_metrics", k, "accuracy", 1.2) for k in (5, 6, 7)],
}


def _publish(root, runs: dict) -> tuple[dict, dict]:
    """The analysis tables as the assets make them (through Parquet), then the database."""
    published = publish_mod.published_runs(root / "runs", GRID)
    runs_df = tables_mod.runs_table(GRID, published, {})
    fits = tables_mod.run_fits(published)
    results, excluded = hypotheses_table(fits, n_boot=100)
    tables = {
        "runs": runs_df,
        "run_settings": tables_mod.run_settings(published),
        "run_fits": fits,
        "hypotheses": results,
        "hypotheses_excluded": excluded,
        "completeness": tables_mod.completeness(runs_df),
    }
    for name, df in tables.items():  # save_table / load_table
        write_parquet(root / "tables" / f"{name}.parquet", df)
        tables[name] = read_parquet(root / "tables" / f"{name}.parquet")
    database_mod.build_database(root / "deconflow.duckdb", published, tables)
    return published, tables


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty")
    for c in GRID.cells:
        if c == NO_BURN_IN:
            write_run(root / "runs", c, loss=lambda s: 1.5 + 2.0 * s**-0.3)
        elif c == DIVERGED_RUN:
            write_run(root / "runs", c, diverge_at=100)
        else:
            write_run(root / "runs", c, edit=EDITS.get(c))
    _publish(root, {})
    gates = gates_mod.quality_gates(root / "deconflow.duckdb")
    return root, gates.set_index("gate")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean sweep: 3 demo runs (one of them 4 epochs long, as the asset tests run)."""
    root = tmp_path_factory.mktemp("clean")
    write_run(root / "runs", cell("base", 0.1))
    write_run(root / "runs", cell("adamw", 0.05))
    write_run(root / "runs", cell("narrow", 0.2), epochs=4)
    published, tables = _publish(root, {})
    return root, published, tables


def _runs_of(gates: pd.DataFrame, gate: str) -> set[str]:
    text = gates.loc[gate, "runs"]
    return set(text.split(", ")) if text else set()


def test_clean_sweep_is_go(clean):
    root, _, _ = clean
    gates = gates_mod.quality_gates(root / "deconflow.duckdb")
    assert list(gates.columns[:4]) == ["gate", "passed", "severity", "violations"]
    assert {"detail", "runs", "n_runs"} <= set(gates.columns)
    assert gates["passed"].all(), gates[~gates["passed"]].to_dict("records")
    assert (gates["violations"] == 0).all()


def test_each_defect_fails_its_gate_naming_exactly_its_runs(faulty):
    _, gates = faulty
    expect = {
        "lr in (0, the cell's lr]": {LR_ABOVE_PEAK.key: 2},
        "train accuracy in [0, 1]": {ACCURACY.key: 3},
        "PSD tail ratio in [0, 1]": {NOISE_AND_NORM.key: 1},
        "gradient norm >= 0": {NOISE_AND_NORM.key: 1},
        "validation loss <= 10 after the early phase": {LATE.key: 1},
        "no NaN/inf outside diverged runs": {NAN_CURVATURE.key: 1},
        "knee epoch within the profile's window": {NO_BURN_IN.key: 1},
    }
    for gate, per_run in expect.items():
        row = gates.loc[gate]
        assert not row["passed"] and row["severity"] == "error", gate
        assert _runs_of(gates, gate) == set(per_run), gate
        assert row["violations"] == sum(per_run.values()) and row["n_runs"] == len(per_run)
        for key, n in per_run.items():
            counted = key if gate.startswith("knee") else f"{key} ({n} row"
            assert counted in row["detail"], (gate, row["detail"])
    assert "curvature_metrics.lambda_max" in gates.loc["no NaN/inf outside diverged runs", "detail"]
    assert (
        f"{NO_BURN_IN.key}: no burn-in"
        in gates.loc["knee epoch within the profile's window", "detail"]
    )
    assert "[0.32, 6.4]" in gates.loc["knee epoch within the profile's window", "detail"]
    # the diverged run's NaN is a result, not a defect; its rows up to divergence are on time
    for gate in gates.index:
        assert DIVERGED_RUN.key not in _runs_of(gates, gate), gate
        assert CLEAN.key not in _runs_of(gates, gate), gate
    for gate in ("train loss in [0, 10]", "loss_bits = loss_nats / ln 2", "weight norm > 0"):
        assert gates.loc[gate, "passed"] and gates.loc[gate, "violations"] == 0


def test_early_validation_blowups_are_their_own_no_go_row(faulty):
    _, gates = faulty
    row = gates.loc["validation blow-ups early in training"]
    # a NO-GO like the knee gate: at least as visible (issue 19)
    assert row["severity"] == "error" and not row["passed"]
    assert row["severity"] == gates.loc["knee epoch within the profile's window", "severity"]
    assert row["violations"] == 3 and row["n_runs"] == 2
    assert _runs_of(gates, "validation blow-ups early in training") == {EARLY.key, EARLY2.key}
    detail = row["detail"]
    assert "validation loss > 10 nats" in detail and "3 rows in 2 runs" in detail
    assert "all before epoch 6.4" in detail and "the latest at epoch 2.00" in detail
    assert "up to 500 nats" in detail
    assert f"{EARLY.key} (2 rows)" in detail and f"{EARLY2.key} (1 row)" in detail
    assert EARLY.key not in _runs_of(gates, "validation loss <= 10 after the early phase")


def test_frequencies_are_checked_against_the_profile_not_the_summary(faulty):
    _, gates = faulty
    gate = "logging frequencies as the profile configures"
    assert not gates.loc[gate, "passed"]
    assert _runs_of(gates, gate) == {FREQUENCY.key, OWN_SUMMARY.key}
    detail = gates.loc[gate, "detail"]
    assert "declares hessian_every=60, profile has 40" in detail
    assert "missing steps 14" in detail and "off-schedule steps 50" in detail
    assert get_profile("demo").hessian_every == 40


def test_no_burn_in_run_has_no_fit_and_is_excluded_with_reason(faulty):
    root, _ = faulty
    con = duckdb.connect(str(root / "deconflow.duckdb"), read_only=True)
    try:
        fit = con.execute(
            "SELECT r_squared, r_squared_noise_limited, exponent, knee_epoch, n_points, "
            "alpha_early_from, alpha_early_to FROM run_fits WHERE run_id = ?",
            [NO_BURN_IN.key],
        ).fetchone()
        reasons = con.execute(
            "SELECT hypothesis, reason FROM hypotheses_excluded WHERE run_id = ? ORDER BY 1",
            [NO_BURN_IN.key],
        ).fetchall()
        good = con.execute(
            "SELECT count(*) FROM run_fits WHERE r_squared >= 0.98 OR r_squared IS NULL"
        ).fetchone()[0]
    finally:
        con.close()
    assert fit[:4] == (None, None, None, None) and fit[4:] == (0, 2, 5)  # SQL NULLs
    assert reasons == [("H1", REASON_NO_BURN_IN)]  # H2's alpha_early needs no burn-in
    assert good == 1  # NULL, not NaN (DuckDB orders NaN above every number)


def test_duckdb_has_no_null_typed_columns(clean):
    root, _, _ = clean
    con = duckdb.connect(str(root / "deconflow.duckdb"), read_only=True)
    try:
        types = con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
        ).fetchall()
        wilson = con.execute(
            "SELECT value, ci_low FROM hypotheses WHERE hypothesis = 'H1' AND smoothing = 'raw'"
        ).fetchone()
        excluded = con.execute("SELECT count(*) FROM hypotheses_excluded").fetchone()[0]
    finally:
        con.close()
    typed = {(t, c): d for t, c, d in types}
    assert [k for k, d in typed.items() if d == "NULL"] == []
    # all-missing columns keep their types
    for column in ("slurm_job_id", "failure_class", "failure_reason", "dagster_run_id"):
        assert typed[("runs", column)] == "VARCHAR"
    assert typed[("hypotheses_excluded", "reason")] == "VARCHAR" and excluded == 1  # 4 epochs
    assert typed[("run_fits", "r_squared")] == "DOUBLE"
    assert typed[("hypotheses", "ci_low")] == "DOUBLE"
    assert typed[("hypotheses", "passed")] == typed[("hypotheses", "point_passed")] == "BOOLEAN"
    assert typed[("hypotheses", "primary")] == "BOOLEAN"
    assert typed[("hypotheses", "verdict")] == typed[("hypotheses", "tier")] == "VARCHAR"
    # no run reaches R² 0.98 on raw noisy batches: the Wilson lower bound is exactly 0
    assert wilson[0] == 0.0 and wilson[1] == 0.0 and math.copysign(1, wilson[1]) == 1


def test_empty_tables_keep_their_types(clean):
    _, _, tables = clean
    fits = tables["run_fits"]
    results, excluded = hypotheses_table(fits[fits["alpha_early"].notna()], n_boot=10)
    empty = {
        "hypotheses_excluded": excluded,
        "run_fits": tables_mod.run_fits({}),
        "run_settings": tables_mod.run_settings({}),
        "runs": tables["runs"].iloc[0:0],
    }
    assert len(excluded) == 0
    con = duckdb.connect()
    try:
        for name, df in empty.items():
            con.register("_df", df)
            kinds = {r[1] for r in con.execute("DESCRIBE _df").fetchall()}
            con.unregister("_df")
            assert '"NULL"' not in kinds and "NULL" not in kinds, name
    finally:
        con.close()


def test_run_fits_use_the_profiles_windows(clean):
    _, _, tables = clean
    fits = tables["run_fits"].set_index("run_id")
    assert set(fits["alpha_early_from"]) == {2} and set(fits["alpha_early_to"]) == {5}
    full = get_profile("full")
    assert tuple(full.alpha_early_epochs) == (5, 15) and tuple(full.knee_epochs) == (1.0, 20.0)
    short = fits.loc[cell("narrow", 0.2).key]  # 4 epochs: the demo window 2-5 is not there
    assert pd.isna(short["alpha_early"])
    long = fits.loc[cell("base", 0.1).key]
    assert long["alpha_early"] < 0 and long["r_squared"] <= long["r_squared_noise_limited"] + 0.02
    assert long["r_squared_epoch_mean"] > long["r_squared"]


def test_export_states_missing_values_and_series_types(faulty, tmp_path):
    root, _ = faulty
    published = publish_mod.published_runs(root / "runs", GRID)
    fits = read_parquet(root / "tables" / "run_fits.parquet")
    meta = export_mod.export_dataset(fits, published, tmp_path)
    assert meta["csv"]["missing_values"].startswith("empty field")
    ts = {c["name"]: c for c in meta["timeseries"]["columns"]}
    assert ts["step"]["type"] == "int64" and ts["run_id"]["type"] == "string"
    assert ts["val_loss"] == {"name": "val_loss", "type": "float64", "nullable": True}
    assert ts["loss_nats"]["nullable"] is False
    assert "null" in meta["timeseries"]["missing_values"]
    cols = {c["name"]: c for c in meta["columns"]}
    assert cols["r_squared"]["type"] == "float64" and cols["r_squared"]["nullable"]
    assert "burn-in" in cols["r_squared"]["description"]
    assert json.loads((tmp_path / "metadata.json").read_text())["csv"] == meta["csv"]
    text = (tmp_path / "run_fits.csv").read_text()
    assert "nan" not in text.lower() and "<NA>" not in text and "e-0" not in text
    csv = pd.read_csv(tmp_path / "run_fits.csv", keep_default_na=False).set_index("run_id")
    assert csv.loc[NO_BURN_IN.key, "r_squared"] == "" and csv.loc[NO_BURN_IN.key, "n_points"] == 0
    series = pd.read_parquet(tmp_path / "timeseries" / f"{CLEAN.key}.parquet")
    assert list(series.columns) == list(ts)
    has_val = series["step"].isin([3, 6, 8, 11])
    assert series.loc[has_val, "val_loss"].notna().all()
    assert series.loc[~has_val & (series["step"] < 11), "val_loss"].isna().all()


def test_science_doc_explains_every_column():
    from pathlib import Path

    from deconflow.analysis.hypotheses import RESULT_COLUMNS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "science.md").read_text()
    fits_part = doc[doc.index("`run_fits` columns") : doc.index("`hypotheses` columns")]
    hyp_part = doc[doc.index("`hypotheses` columns") : doc.index("## Quality gates")]
    for column in tables_mod.FIT_COLUMNS:
        assert f"| {column} |" in fits_part, column
    for column in RESULT_COLUMNS:
        assert f"| {column} |" in hyp_part, column


def test_gates_by_variant_name_the_failing_arms(faulty):
    from deconflow.assets.checks import gates_verdict

    _, gates = faulty
    by_variant = gates_mod.gates_by_variant(gates.reset_index(), ["adamw", "base", "zzz"])
    assert list(by_variant.columns) == ["variant", "gate", "verdict", "n_runs", "runs"]
    knee = by_variant[by_variant["gate"] == "knee epoch within the profile's window"]
    bad = knee[knee["verdict"] == "NO-GO"]
    assert list(bad["runs"]) == [NO_BURN_IN.key]
    assert list(bad["variant"]) == [NO_BURN_IN.variant]
    assert (by_variant.loc[by_variant["variant"] == "zzz", "verdict"] == "GO").all()
    arms = gates_mod.failing_arms(by_variant)
    assert NO_BURN_IN.variant in arms and "zzz" not in arms
    go, description, meta = gates_verdict(gates.reset_index(), ["zzz"])
    assert not go and description.startswith("NO-GO in arms ")
    assert f"{NO_BURN_IN.variant} (" in description
    assert "gates_by_variant" in meta and "zzz: GO" in meta["arms"]


def test_profiles_scale_the_analysis_windows():
    from deconflow.profiles import scaled_windows
    from deconflow.sweep import GridError

    assert scaled_windows(50) == {"alpha_early_epochs": (5, 15), "knee_epochs": (1.0, 20.0)}
    assert scaled_windows(16) == {"alpha_early_epochs": (2, 5), "knee_epochs": (0.32, 6.4)}
    assert scaled_windows(100)["alpha_early_epochs"] == (10, 30)
    demo = get_profile("demo")
    assert tuple(demo.alpha_early_epochs) == (2, 5) and tuple(demo.knee_epochs) == (0.32, 6.4)
    # at least 4 curvature points in a demo run (16 epochs of 11 steps)
    assert len(range(demo.hessian_every, demo.epochs * 11 + 1, demo.hessian_every)) >= 4
    assert tuple(get_profile("demo", alpha_early_epochs=[3, 6]).alpha_early_epochs) == (3, 6)
    for bad in ({"alpha_early_epochs": (5, 3)}, {"alpha_early_epochs": (0, 3)}):
        with pytest.raises(GridError, match="alpha_early_epochs"):
            get_profile("demo", **bad)
    with pytest.raises(GridError, match="knee_epochs"):
        get_profile("demo", knee_epochs=(3.0, 1.0))


def test_export_rewrites_only_the_time_series_whose_run_changed(faulty, tmp_path):
    """A refresh after one cell landed rewrites that cell's series, not the whole sweep's;
    a republished run is rewritten even when its files carry an older mtime (publishing
    keeps the training's own write time)."""
    import os
    import shutil

    root, _ = faulty
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    published = publish_mod.published_runs(runs, GRID)
    fits = read_parquet(root / "tables" / "run_fits.parquet")
    out = tmp_path / "export"
    first = export_mod.export_dataset(fits, published, out)
    assert first["timeseries"]["rewritten_this_refresh"] == len(published)
    series = {k: (out / "timeseries" / f"{k}.parquet") for k in published}
    before = {k: p.stat().st_mtime_ns for k, p in series.items()}

    again = export_mod.export_dataset(fits, published, out)
    assert again["timeseries"]["rewritten_this_refresh"] == 0
    assert {k: p.stat().st_mtime_ns for k, p in series.items()} == before

    # CLEAN's run is published again with new losses, its files dated before the export.
    batch_file = published[CLEAN.key] / family_file("batch_metrics")
    old_stat = batch_file.stat()
    batch = read_parquet(batch_file)
    batch["loss_nats"] = batch["loss_nats"] + 1.0
    write_parquet(batch_file, batch)
    os.utime(batch_file, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
    third = export_mod.export_dataset(fits, published, out)
    assert third["timeseries"]["rewritten_this_refresh"] == 1
    rewritten = pd.read_parquet(series[CLEAN.key])
    assert np.allclose(rewritten["loss_nats"].to_numpy(), batch["loss_nats"].to_numpy())
    assert all(series[k].stat().st_mtime_ns == before[k] for k in published if k != CLEAN.key)


def test_status_shows_the_short_verdict_table(clean):
    from deconflow.status import verdict_summary

    root, _, _ = clean
    text = verdict_summary(root / "deconflow.duckdb")
    lines = text.splitlines()
    assert lines[0].startswith("hypotheses (primary first")
    assert lines[2].startswith("H1   primary") and lines[3].startswith("H2   primary")
    assert len(lines) <= 16 and "nan" not in text.lower()
    assert "no database yet" in verdict_summary(root / "missing.duckdb")
