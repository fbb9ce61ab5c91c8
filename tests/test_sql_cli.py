"""`deconflow sql` and `deconflow dev` as a user types them (the real CLI entry point on a
real published DuckDB file)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bench.analysis_scale import synth_run
from deconflow.cli import _dev_command, main
from deconflow.sweep import load_grid
from deconflow.warehouse.database import publish_database

CELLS = load_grid().cells[:3]


@pytest.fixture
def published(tmp_path, monkeypatch):
    monkeypatch.setenv("DECONFLOW_DATA", str(tmp_path))
    monkeypatch.delenv("DECONFLOW_DB", raising=False)
    rng = np.random.default_rng(0)
    runs = {}
    for c in CELLS:
        d = tmp_path / "runs" / c.key
        d.mkdir(parents=True)
        synth_run(d, c.key, 800, rng)
        runs[c.key] = d
    fits = pd.DataFrame(
        {"run_id": list(runs), "variant": [c.variant for c in CELLS], "best_val_ce": [1.0, 2, 3]}
    )
    publish_database(tmp_path / "deconflow.duckdb", runs, {"run_fits": fits})
    return tmp_path


def test_sql_prints_no_rows_and_readable_aggregate_names(published, capsys):
    assert main(["sql", "SELECT * FROM run_fits WHERE best_val_ce > 100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("(no rows; columns: run_id, variant, best_val_ce)")
    assert main(["sql", "SELECT variant, count(*), avg(best_val_ce) FROM run_fits GROUP BY 1"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "count(*)" in header and "avg(best_val_ce)" in header and "count_star" not in header
    assert main(["sql", "SELECT count(DISTINCT run_id) AS runs FROM batch_metrics"]) == 0
    assert capsys.readouterr().out.split() == ["runs", "3"]


def test_sql_errors_are_one_line(published, capsys):
    assert main(["sql", "SELECT nope FROM run_fits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deconflow: error: SQL error:") and "\n" not in err


def test_sql_help_lists_tables_and_examples():
    out = subprocess.run(
        [sys.executable, "-m", "deconflow.cli", "sql", "--help"], capture_output=True, text=True
    ).stdout
    for table in ("runs", "run_fits", "hypotheses", "completeness", "batch_metrics", "publication"):
        assert f"\n  {table} " in out
    assert 'deconflow sql "SELECT' in out and "duckdb -readonly" in out


def test_dev_passes_every_option_to_dagster_dev():
    assert _dev_command(["--port", "3001", "--host", "0.0.0.0"]) == [
        "dagster",
        "dev",
        "-m",
        "deconflow.definitions",
        "--port",
        "3001",
        "--host",
        "0.0.0.0",
    ]
    assert _dev_command(["-p", "3002", "--log-level", "debug"])[-4:] == [
        "-p",
        "3002",
        "--log-level",
        "debug",
    ]
    # The user's own code target replaces ours.
    assert _dev_command(["-w", "my_workspace.yaml"]) == [
        "dagster",
        "dev",
        "-w",
        "my_workspace.yaml",
    ]
    assert "-m" not in _dev_command(["--module-name=other.defs"])
