"""The analysis tables of SPEC section 5 as DataFrames: runs, run_fits, completeness.

Every table has explicit column dtypes (pandas "string", "Float64", "Int64", ...), so a
column whose values are all missing still lands in DuckDB with its type, never as NULL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from deconflow.analysis.fits import fit_arrays
from deconflow.datadict import FIT_COLUMN_DOCS
from deconflow.profiles import PLAN_EPOCHS, get_profile, scaled_windows
from deconflow.protocol import (
    DIVERGED,
    FAILED,
    MATERIALIZED,
    MISSING,
    RUNNING,
    family_file,
    partition_key_str,
)
from deconflow.sweep import Grid, GridError, parse_key
from deconflow.warehouse.publish import read_summary

# run_fits: columns, types and meanings in the one data dictionary (deconflow/datadict.py).
FIT_COLUMNS = list(FIT_COLUMN_DOCS)
FIT_DTYPES = {c: t for c, (t, _) in FIT_COLUMN_DOCS.items()}


def _analysis_config(summary: dict) -> tuple[tuple[int, int], float | None]:
    """(alpha_early window, analysis horizon in epochs) from the run's profile.

    The profile's configuration decides (every run of a sweep is analysed alike), not the
    run's own overrides; a run of an unknown profile gets the plan's windows scaled to its
    length (`scaled_windows`).
    """
    try:
        cfg = get_profile(str(summary.get("profile")))
    except GridError:
        epochs = summary.get("epochs") or PLAN_EPOCHS
        return tuple(scaled_windows(int(epochs))["alpha_early_epochs"]), None
    return tuple(cfg.alpha_early_epochs), float(cfg.epochs)


def _read_columns(path: Path, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of a Parquet file as float arrays, straight from Arrow (no DataFrame)."""
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_numpy().astype(float, copy=False) for c in columns}


def run_fits(runs: dict[str, Path]) -> pd.DataFrame:
    """One row of SPEC section 4 numbers per published run (typed: see FIT_COLUMN_DOCS)."""
    rows = []
    for key, d in runs.items():
        cell = parse_key(key)
        s = read_summary(d)
        window, horizon = _analysis_config(s)
        b = _read_columns(d / family_file("batch_metrics"), ["step", "epoch", "loss_nats"])
        v = _read_columns(d / family_file("val_metrics"), ["epoch", "val_loss"])
        fit = fit_arrays(
            b["step"],
            b["epoch"],
            b["loss_nats"],
            v["epoch"],
            v["val_loss"],
            max_epoch=horizon,
            alpha_early_epochs=window,
        )
        rows.append(
            {
                "run_id": key,
                "variant": cell.variant,
                "seed": cell.seed,
                "lr": cell.lr,
                "weight_decay": cell.weight_decay,
                **fit,
                "outcome": s.get("outcome"),
                "alpha_early_from": window[0],
                "alpha_early_to": window[1],
                "profile": s.get("profile"),
            }
        )
    return typed(pd.DataFrame(rows, columns=FIT_COLUMNS), FIT_DTYPES)


def typed(df: pd.DataFrame, dtypes: dict[str, str]) -> pd.DataFrame:
    """`df` with explicit dtypes: NaN/None become NA, so DuckDB gets typed NULLs (never a
    column of type NULL, even when every value is missing)."""
    out = df.copy()
    for c, t in dtypes.items():
        if t in ("Float64", "Int64"):
            out[c] = pd.to_numeric(out[c], errors="coerce").astype(t)
        elif t == "string":
            out[c] = out[c].astype("object").where(out[c].notna(), None).astype("string")
        else:
            out[c] = out[c].astype(t)
    return out


RUNS_DTYPES = {
    "run_id": "string",
    "partition_key": "string",
    "variant": "string",
    "lr": "float64",
    "weight_decay": "float64",
    "seed": "int64",
    "status": "string",
    "outcome": "string",
    "attempts": "int64",
    "resumes": "int64",
    "wall_time_s": "Float64",
    "slurm_job_id": "string",
    "failure_class": "string",
    "failure_reason": "string",
    "steps": "Int64",
    "profile": "string",
    "final_train_loss": "Float64",
    "best_val_ce": "Float64",
    "dagster_run_id": "string",
}


def runs_table(grid: Grid, runs: dict[str, Path], states: dict[str, dict]) -> pd.DataFrame:
    """One row per grid cell: identity, Dagster status, outcome and attempt bookkeeping."""
    rows = []
    for cell in grid.cells:
        st = states.get(cell.key, {})
        s = read_summary(runs[cell.key]) if cell.key in runs else {}
        rows.append(
            {
                "run_id": cell.key,
                "partition_key": partition_key_str(cell),
                "variant": cell.variant,
                "lr": cell.lr,
                "weight_decay": cell.weight_decay,
                "seed": cell.seed,
                "status": cell_status(cell.key in runs, s, st),
                "outcome": s.get("outcome"),
                "attempts": st.get("attempts", 0),
                "resumes": max(0, s.get("attempts", 1) - 1) if s else 0,
                "wall_time_s": s.get("wall_time_s"),
                "slurm_job_id": st.get("slurm_job_id"),
                "failure_class": st.get("failure_class"),
                "failure_reason": st.get("reason"),
                "steps": s.get("steps"),
                "profile": s.get("profile"),
                "final_train_loss": s.get("final_train_loss"),
                "best_val_ce": s.get("best_val_ce"),
                "dagster_run_id": st.get("run_id"),
            }
        )
    return typed(pd.DataFrame(rows, columns=list(RUNS_DTYPES)), RUNS_DTYPES)


def cell_status(published: bool, summary: dict, state: dict) -> str:
    """materialized | diverged | running | failed | missing (Dagster's latest run wins)."""
    if state.get("status") == RUNNING:
        return RUNNING
    if state.get("status") == FAILED:
        return FAILED
    if published:
        return DIVERGED if summary.get("outcome") == DIVERGED else MATERIALIZED
    return MISSING


COMPLETENESS_DTYPES = {
    **{c: RUNS_DTYPES[c] for c in ("run_id", "partition_key", "variant", "lr", "weight_decay")},
    **{c: RUNS_DTYPES[c] for c in ("seed", "status", "attempts")},
    "reason": "string",
}
SETTINGS_DTYPES = {
    "run_id": "string",
    "profile": "string",
    "steps_per_epoch": "Int64",
    "epochs": "Int64",
    "val_per_epoch": "Int64",
    "hessian_every": "Int64",
    "noise_every_epochs": "Int64",
}


def _text(value) -> str | None:
    """A string cell as str, or None when missing (NA/None/NaN are not truthy-testable)."""
    return None if value is None or pd.isna(value) else str(value)


def completeness(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: status and a human reason (SPEC section 4, completeness)."""

    def reason(r) -> str:
        if r.status == FAILED:
            cls, why = _text(r.failure_class), _text(r.failure_reason)
            return f"{cls or 'unknown'}: {why or 'see the Dagster run'}"
        if r.status == DIVERGED:
            return "non-finite training loss (a result, not retried)"
        if r.status == RUNNING:
            return f"attempt {r.attempts} in progress"
        if r.status == MISSING:
            return "never materialized"
        return "ok"

    out = runs_df[
        ["run_id", "partition_key", "variant", "lr", "weight_decay", "seed", "status", "attempts"]
    ].copy()
    out["reason"] = [reason(r) for r in runs_df.itertuples()]
    return typed(out, COMPLETENESS_DTYPES)


def run_settings(runs: dict[str, Path]) -> pd.DataFrame:
    """Each run's own logging settings and size, as its summary states them. The frequency
    gate checks the rows against the *profile's* configuration and these against it."""
    cols = [c for c in SETTINGS_DTYPES if c not in ("run_id", "profile")]
    rows = []
    for key, d in runs.items():
        s = read_summary(d)
        rows.append({"run_id": key, "profile": s.get("profile"), **{c: s.get(c) for c in cols}})
    return typed(pd.DataFrame(rows, columns=list(SETTINGS_DTYPES)), SETTINGS_DTYPES)
