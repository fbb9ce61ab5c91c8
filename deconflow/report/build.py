"""Build the report from what the analysis assets saved (``data/tables/*.parquet``), the
published runs (``data/runs/``) and the quality gates of the published DuckDB file."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from deconflow.report.data import ReportInputError
from deconflow.report.page import build_report
from deconflow.settings import db_path, runs_dir, tables_dir
from deconflow.sweep import Grid


def read_table(name: str, required: bool = False) -> pd.DataFrame | None:
    """A saved analysis table, or None when it has not been computed (an error if
    `required`); an unreadable file is an error with its path."""
    path = tables_dir() / f"{name}.parquet"
    if not path.exists():
        if required:
            raise ReportInputError(f"table {name} has not been computed yet ({path} is missing)")
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # a corrupt or foreign file: say which, in one line
        raise ReportInputError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def read_gates(log: Callable[[str], None] | None = None) -> tuple[pd.DataFrame | None, float]:
    """The quality gates of the published DuckDB file (None when there is none yet) and
    the seconds they took."""
    from deconflow.warehouse import gates as gates_mod
    from deconflow.warehouse.database import snapshot_path

    t0 = time.perf_counter()
    try:
        snap = snapshot_path(db_path())
    except Exception as e:  # no database published yet
        if log:
            log(f"quality gates not evaluated: {type(e).__name__}: {e}")
        return None, 0.0
    if snap is None or not Path(snap).exists():
        return None, 0.0
    try:
        gates = gates_mod.quality_gates(snap)
    except Exception as e:  # the page says the gates are missing; the log says why
        if log:
            log(f"quality gates not evaluated: {type(e).__name__}: {e}")
        return None, time.perf_counter() - t0
    return gates, time.perf_counter() - t0


def build_from_tables(
    out: Path,
    grid: Grid,
    *,
    state=None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write the report for `grid` to `out`; returns build_report's info plus the coverage
    metadata (`state`: the landings the analysis covers, see deconflow.assets.freshness)."""
    from deconflow.warehouse.publish import published_runs

    say = log or (lambda msg: None)
    fits = read_table("run_fits", required=True)
    completeness = read_table("completeness")
    gates, gates_s = read_gates(say)
    published = published_runs(runs_dir(), grid)
    coverage: dict = {"coverage": f"{len(fits)} of {len(grid)} cells fitted"}
    if state is not None:
        from deconflow.assets import freshness

        coverage = freshness.coverage_metadata(state, len(fits), len(grid))
    text = coverage["coverage"]
    if state is not None and getattr(state, "cell", None):
        text += f", newest landing {state.cell}"
    info = build_report(
        out,
        title=f"deconflow sweep report: {grid.name}",
        coverage={"text": text},
        completeness=completeness,
        fits=fits,
        hypotheses=read_table("hypotheses"),
        excluded=read_table("hypotheses_excluded"),
        gates=gates,
        published=published,
        progress=say,
    )
    say(
        f"report {out}: {info['runs']} runs, {info['bytes'] / 1e6:.2f} MB, "
        f"built in {info['total_s']:.2f} s (+ gates {gates_s:.2f} s)"
    )
    return {**info, "coverage": coverage, "gates_s": round(gates_s, 3)}
