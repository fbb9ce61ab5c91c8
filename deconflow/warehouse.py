"""From run folders to the DuckDB file users query (SPEC section 5).

Runs land as Parquet in ``data/runs/<cell key>/``; a single writer (the ``duckdb``
concurrency pool) builds a fresh database file next to the old one and renames it into
place. Readers never see a lock or a half-built database, and a re-run cell replaces
its folder, so its rows are replaced, never duplicated.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from deconflow.analysis.fits import fit_run
from deconflow.atomic import atomic_write_bytes, atomic_write_json
from deconflow.sweep import Grid, GridError, parse_key
from deconflow.training.metrics_io import FAMILIES, write_parquet

RUN_FILES = [f"{f}.parquet" for f in FAMILIES] + ["summary.json", "train.log"]

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


def publish_run(work: Path, runs_root: Path) -> Path:
    """Copy a finished attempt's results into ``runs_root/<key>``, replacing the old ones."""
    final = runs_root / work.name
    tmp = runs_root / f".tmp-{work.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for name in RUN_FILES:
        if (work / name).exists():
            shutil.copy2(work / name, tmp / name)
    trash = None
    if final.exists():
        trash = runs_root / f".old-{work.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
    os.rename(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def published_runs(runs_root: Path, grid: Grid | None = None) -> dict[str, Path]:
    """Published run folders by cell key (only cells of ``grid`` when given)."""
    out: dict[str, Path] = {}
    if not runs_root.exists():
        return out
    for d in sorted(runs_root.iterdir()):
        if d.name.startswith(".") or not (d / "summary.json").exists():
            continue
        try:
            cell = parse_key(d.name)
        except GridError:
            continue
        if grid is None or cell in grid:
            out[d.name] = d
    return out


def read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def run_fits(runs: dict[str, Path]) -> pd.DataFrame:
    """One row of SPEC section 4 numbers per published run."""
    rows = []
    for key, d in runs.items():
        cell = parse_key(key)
        s = read_summary(d)
        batch = pd.read_parquet(d / "batch_metrics.parquet", columns=["step", "epoch", "loss_nats"])
        val = pd.read_parquet(d / "val_metrics.parquet", columns=["epoch", "val_loss"])
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
                "partition_key": f"{cell.hp}|{cell.variant}",
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
    if state.get("status") == "running":
        return "running"
    if state.get("status") == "failed":
        return "failed"
    if published:
        return "diverged" if summary.get("outcome") == "diverged" else "materialized"
    return "missing"


def completeness(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: status and a human reason (SPEC section 4, completeness)."""

    def reason(r) -> str:
        if r.status == "failed":
            return f"{r.failure_class or 'unknown'}: {r.failure_reason or 'see the Dagster run'}"
        if r.status == "diverged":
            return "non-finite training loss (a result, not retried)"
        if r.status == "running":
            return f"attempt {r.attempts} in progress"
        if r.status == "missing":
            return "never materialized"
        return "ok"

    out = runs_df[
        ["run_id", "partition_key", "variant", "lr", "weight_decay", "seed", "status", "attempts"]
    ].copy()
    out["reason"] = [reason(r) for r in runs_df.itertuples()]
    return out


def _empty_family(family: str) -> pd.DataFrame:
    cols = ["run_id", *FAMILIES[family]]
    df = pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    return df.astype({"run_id": "object", "step": "int64"})


def build_database(db_path: Path, runs: dict[str, Path], tables: dict[str, pd.DataFrame]) -> dict:
    """Write a fresh DuckDB file with every table and rename it over ``db_path``."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f".{db_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    counts: dict[str, int] = {}
    con = duckdb.connect(str(tmp))
    try:
        for family in FAMILIES:
            files = [
                str(d / f"{family}.parquet")
                for d in runs.values()
                if (d / f"{family}.parquet").exists()
            ]
            if files:
                con.execute(
                    f"CREATE TABLE {family} AS SELECT * FROM read_parquet(?, union_by_name=true) "
                    "ORDER BY run_id, step",
                    [files],
                )
            else:
                con.register("_empty", _empty_family(family))
                con.execute(f"CREATE TABLE {family} AS SELECT * FROM _empty")
                con.unregister("_empty")
        for name, df in tables.items():
            con.register("_df", df)
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM _df")
            con.unregister("_df")
        for name in [*FAMILIES, *tables]:
            counts[name] = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, db_path)
    return counts


def quality_gates(db_path: Path) -> pd.DataFrame:
    """GO / NO-GO gates of SPEC section 4, evaluated with SQL on the published database."""
    con = duckdb.connect(str(db_path), read_only=True)
    q = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
    ok_runs = "SELECT run_id FROM runs WHERE outcome = 'completed'"
    gates = []

    def gate(name: str, bad: int, detail: str) -> None:
        gates.append({"gate": name, "passed": bad == 0, "violations": int(bad), "detail": detail})

    try:
        gate(
            "loss in [0, 10]",
            q(
                f"SELECT count(*) FROM batch_metrics WHERE run_id IN ({ok_runs}) "
                "AND NOT (loss_nats BETWEEN 0 AND 10)"
            ),
            "batch rows of completed runs with loss outside [0, 10]",
        )
        gate(
            "accuracy in [0, 1]",
            q(
                "SELECT (SELECT count(*) FROM batch_metrics WHERE NOT "
                "(accuracy BETWEEN 0 AND 1)) + (SELECT count(*) FROM "
                "val_metrics WHERE NOT (val_accuracy BETWEEN 0 AND 1))"
            ),
            "batch and validation rows with accuracy outside [0, 1]",
        )
        gate(
            "lr > 0",
            q("SELECT count(*) FROM batch_metrics WHERE NOT (lr > 0)"),
            "batch rows with a learning rate <= 0",
        )
        nonfinite = " OR ".join(f"NOT isfinite({c})" for c in ("loss_nats", "accuracy", "lr"))
        vnonfinite = " OR ".join(
            f"NOT isfinite({c})" for c in ("val_loss", "val_accuracy", "weight_norm")
        )
        gate(
            "no NaN/inf outside diverged runs",
            q(
                f"SELECT (SELECT count(*) FROM batch_metrics WHERE run_id IN ({ok_runs}) AND "
                f"({nonfinite})) + (SELECT count(*) FROM val_metrics WHERE run_id IN ({ok_runs}) "
                f"AND ({vnonfinite}))"
            ),
            "non-finite metric rows in runs that did not diverge",
        )
        gate(
            "knee epoch in [1, 20]",
            q(
                "SELECT count(*) FROM run_fits WHERE outcome = 'completed' AND "
                "(knee_epoch IS NULL OR isnan(knee_epoch) OR NOT (knee_epoch BETWEEN 1 AND 20))"
            ),
            "completed runs whose burn-in knee is missing or outside epochs 1..20",
        )
        bad_freq = (
            con.execute(f"""
            WITH c AS (
              SELECT r.run_id, CAST(r.steps AS BIGINT) AS steps, s.steps_per_epoch, s.epochs,
                     s.val_per_epoch, s.hessian_every, s.noise_every_epochs,
                (SELECT count(*) FROM batch_metrics b WHERE b.run_id = r.run_id) AS nb,
                (SELECT count(*) FROM val_metrics v WHERE v.run_id = r.run_id) AS nv,
                (SELECT count(*) FROM curvature_metrics h WHERE h.run_id = r.run_id) AS nh,
                (SELECT count(*) FROM noise_metrics n WHERE n.run_id = r.run_id) AS nn
              FROM runs r JOIN run_settings s USING (run_id)
              WHERE r.run_id IN ({ok_runs}))
            SELECT list(run_id) FROM c WHERE nb <> steps
              OR nv <> epochs * val_per_epoch
              OR nh <> (CASE WHEN hessian_every > 0 THEN steps // hessian_every ELSE 0 END)
              OR nn <> (CASE WHEN noise_every_epochs > 0 THEN epochs // noise_every_epochs
                        ELSE 0 END)
        """).fetchone()[0]
            or []
        )
        gate(
            "logging frequencies as in SPEC section 3",
            len(bad_freq),
            "completed runs with missing or extra metric rows: " + ", ".join(bad_freq[:10]),
        )
    finally:
        con.close()
    return pd.DataFrame(gates)


def run_settings(runs: dict[str, Path]) -> pd.DataFrame:
    """The per-run logging settings the frequency gate checks against."""
    cols = ["steps_per_epoch", "epochs", "val_per_epoch", "hessian_every", "noise_every_epochs"]
    rows = []
    for key, d in runs.items():
        s = read_summary(d)
        rows.append({"run_id": key, "profile": s.get("profile"), **{c: s.get(c) for c in cols}})
    return pd.DataFrame(rows, columns=["run_id", "profile", *cols])


def _positional(x) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return ""
    if isinstance(x, float | np.floating):
        return np.format_float_positional(float(x), trim="-", precision=12)
    return str(x)


def export_dataset(fits: pd.DataFrame, runs: dict[str, Path], out: Path) -> dict:
    """The tier-4 export: run_fits CSV (no scientific notation), metadata, time series."""
    out.mkdir(parents=True, exist_ok=True)
    text = fits.map(_positional).to_csv(index=False)
    atomic_write_bytes(out / "run_fits.csv", lambda f: f.write(text.encode()))
    ts_dir = out / "timeseries"
    ts_dir.mkdir(exist_ok=True)
    for key, d in runs.items():
        batch = pd.read_parquet(d / "batch_metrics.parquet")
        val = pd.read_parquet(d / "val_metrics.parquet").drop(columns=["run_id", "epoch"])
        write_parquet(ts_dir / f"{key}.parquet", batch.merge(val, on="step", how="left"))
    for stale in set(p.stem for p in ts_dir.glob("*.parquet")) - set(runs):
        (ts_dir / f"{stale}.parquet").unlink()
    meta = {
        "dataset": "loss-slope sweep run_fits",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "row_count": len(fits),
        "columns": [{"name": c, "type": str(t)} for c, t in fits.dtypes.items()],
        "timeseries": {
            "folder": "timeseries",
            "files": len(runs),
            "format": "parquet",
            "columns": "batch metrics per step, validation metrics joined on step",
        },
    }
    atomic_write_json(out / "metadata.json", meta)
    return meta
