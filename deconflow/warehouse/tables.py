"""The analysis tables of SPEC section 5 as DataFrames: runs, run_fits, completeness."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from deconflow.analysis.fits import fit_run
from deconflow.protocol import (
    DIVERGED,
    FAILED,
    MATERIALIZED,
    MISSING,
    RUNNING,
    family_file,
    partition_key_str,
)
from deconflow.sweep import Grid, parse_key
from deconflow.warehouse.publish import read_summary

FIT_COLUMNS = [
    "run_id",
    "variant",
    "seed",
    "lr",
    "weight_decay",
    "r_squared",
    "knee_epoch",
    "burn_in_loss",
    "alpha_early",
    "alpha_full",
    "best_val_ce",
    "best_val_epoch",
    "exponent",
    "intercept",
    "n_points",
    "outcome",
]


def run_fits(runs: dict[str, Path]) -> pd.DataFrame:
    """One row of SPEC section 4 numbers per published run."""
    rows = []
    for key, d in runs.items():
        cell = parse_key(key)
        s = read_summary(d)
        batch = pd.read_parquet(
            d / family_file("batch_metrics"), columns=["step", "epoch", "loss_nats"]
        )
        val = pd.read_parquet(d / family_file("val_metrics"), columns=["epoch", "val_loss"])
        fit = fit_run(batch.rename(columns={"loss_nats": "loss"}), val)
        rows.append(
            {
                "run_id": key,
                "variant": cell.variant,
                "seed": cell.seed,
                "lr": cell.lr,
                "weight_decay": cell.weight_decay,
                **fit,
                "outcome": s["outcome"],
            }
        )
    return pd.DataFrame(rows, columns=FIT_COLUMNS).astype({"seed": "int64", "n_points": "int64"})


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
    df = pd.DataFrame(rows)
    for c in ("attempts", "resumes"):
        df[c] = df[c].astype("int64")
    df["steps"] = df["steps"].astype("Int64")
    for c in ("wall_time_s", "final_train_loss", "best_val_ce"):
        df[c] = df[c].astype("float64")
    return df


def cell_status(published: bool, summary: dict, state: dict) -> str:
    """materialized | diverged | running | failed | missing (Dagster's latest run wins)."""
    if state.get("status") == RUNNING:
        return RUNNING
    if state.get("status") == FAILED:
        return FAILED
    if published:
        return DIVERGED if summary.get("outcome") == DIVERGED else MATERIALIZED
    return MISSING


def completeness(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: status and a human reason (SPEC section 4, completeness)."""

    def reason(r) -> str:
        if r.status == FAILED:
            return f"{r.failure_class or 'unknown'}: {r.failure_reason or 'see the Dagster run'}"
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
    return out


def run_settings(runs: dict[str, Path]) -> pd.DataFrame:
    """The per-run logging settings the frequency gate checks against."""
    cols = ["steps_per_epoch", "epochs", "val_per_epoch", "hessian_every", "noise_every_epochs"]
    rows = []
    for key, d in runs.items():
        s = read_summary(d)
        rows.append({"run_id": key, "profile": s.get("profile"), **{c: s.get(c) for c in cols}})
    return pd.DataFrame(rows, columns=["run_id", "profile", *cols])
