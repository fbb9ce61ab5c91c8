"""Read-side helpers for the CLI: the live completeness grid and read-only SQL."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from deconflow.protocol import DIVERGED, FAILED, MATERIALIZED, MISSING, RUNNING
from deconflow.settings import db_path, runs_dir
from deconflow.sweep import Cell, Grid
from deconflow.warehouse import publish as publish_mod
from deconflow.warehouse import tables as tables_mod

SYMBOLS = {MATERIALIZED: "#", DIVERGED: "D", RUNNING: "~", FAILED: "F", MISSING: "."}


def live_runs_table(grid: Grid, instance) -> pd.DataFrame:
    """The ``runs`` table as it stands now (Dagster instance + published run folders)."""
    from deconflow.run_index import partition_states

    published = publish_mod.published_runs(runs_dir(), grid)
    return tables_mod.runs_table(grid, published, partition_states(instance, grid.name))


def format_grid(grid: Grid, runs: pd.DataFrame) -> str:
    """variant x (lr, wd) matrix; each entry has one symbol per seed."""
    status = {r.run_id: r.status for r in runs.itertuples()}
    variants = sorted(grid.variants)
    lines = [
        "legend: # materialized  D diverged  ~ running  F failed  . missing; "
        f"one symbol per seed {list(sorted(grid.seeds))}"
    ]
    head = f"{'lr / wd':<16}" + "".join(f"{v:<{max(8, len(grid.seeds) + 2)}}" for v in variants)
    lines.append(head)
    for lr in sorted(grid.lrs):
        for wd in sorted(grid.weight_decays):
            row = f"{f'lr{lr:g} wd{wd:g}':<16}"
            for v in variants:
                marks = "".join(
                    SYMBOLS[status.get(Cell(v, lr, wd, s).key, MISSING)] for s in sorted(grid.seeds)
                )
                row += f"{marks:<{max(8, len(grid.seeds) + 2)}}"
            lines.append(row)
    counts = Counter(runs["status"])
    lines.append(
        "totals: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in SYMBOLS) + f" (of {len(runs)})"
    )
    failed = runs[runs["status"] == FAILED]
    for r in failed.itertuples():
        lines.append(f"  failed {r.run_id}: {r.failure_class}: {r.failure_reason}")
    return "\n".join(lines)


class NoDatabase(FileNotFoundError):
    pass


def readable_columns(df: pd.DataFrame) -> pd.DataFrame:
    """DuckDB names ``count(*)`` ``count_star()``: show what the user wrote."""
    return df.rename(columns=lambda c: str(c).replace("count_star()", "count(*)"))


def status_json(grid: Grid, runs: pd.DataFrame) -> dict:
    """``deconflow status --json``: the totals and one object per cell (the ``runs`` table's
    columns), for scripts."""
    counts = Counter(runs["status"])
    cells = json.loads(runs.to_json(orient="records", date_format="iso"))
    return {
        "grid": grid.name,
        "cells": len(runs),
        "totals": {k: int(counts.get(k, 0)) for k in SYMBOLS},
        "verdicts": verdict_records(),
        "runs": cells,
    }


def verdict_records(path: Path | None = None) -> list[dict]:
    """The short verdict table as records for ``status --json`` (empty before an analysis)."""
    short, _ = published_verdicts(path)
    return [] if short is None else json.loads(short.to_json(orient="records"))


def run_sql_all(query: str, path: Path | None = None) -> list[tuple[str, pd.DataFrame]]:
    """Every statement of ``query`` with its result, run in order on one read-only
    connection to the current snapshot."""
    from deconflow.warehouse.database import connect_readonly, snapshot_path

    path = path or db_path()
    if not snapshot_path(path).exists():
        raise NoDatabase(
            f"no database at {path}: run `deconflow demo` or materialize sweep_db first"
        )
    con = connect_readonly(path)
    try:
        out = []
        for stmt in con.extract_statements(query):
            text = " ".join(stmt.query.split())
            out.append((text, readable_columns(con.execute(stmt.query).df())))
        return out
    finally:
        con.close()


def run_sql(query: str, path: Path | None = None) -> pd.DataFrame:
    """Run SQL read-only on the published database: on the current snapshot, so neither a
    user's read-write session nor a publication in progress can block or break it. The last
    statement's result."""
    return run_sql_all(query, path)[-1][1]


def published_verdicts(path: Path | None = None) -> tuple[pd.DataFrame | None, str]:
    """The short verdict table of the published `hypotheses` table, or None and why not."""
    from deconflow.analysis.hypotheses import verdict_table

    try:
        hyp = run_sql("SELECT * FROM hypotheses", path)
    except NoDatabase:
        return None, "no database yet (run the analysis)"
    except Exception as e:  # an old database without the table
        return None, f"unreadable ({str(e).splitlines()[0]})"
    if "verdict" not in hyp.columns:
        return None, "published before verdicts existed; materialize the analysis again"
    return verdict_table(hyp), ""


def verdict_summary(path: Path | None = None) -> str:
    """The short verdict table (primary rows first, then per variant) as text for
    `deconflow status`; a hint when nothing is published."""
    from deconflow.analysis.hypotheses import format_verdicts

    short, why = published_verdicts(path)
    if short is None:
        return f"hypotheses: {why}"
    return "hypotheses (primary first; full table: deconflow sql 'SELECT * FROM hypotheses')\n" + (
        format_verdicts(short)
    )
