"""The asset graph end to end on a temporary instance: rows, reruns, checks, export."""

from __future__ import annotations

import json

import dagster as dg
import duckdb
import pandas as pd
import pytest

from deconflow.partitions import cell_for, partition_key, partitions_def
from deconflow.sweep import Cell, grid_from_dict, load_grid
from tests.helpers import asset, data_path, downstream, make_defs

OK = [Cell("base", 0.1, 1e-3, 0), Cell("adamw", 0.05, 1e-4, 1)]
DIVERGED = Cell("bn_off", 0.2, 1e-2, 2)
CRASHED = Cell("narrow", 0.2, 1e-2, 3)


@pytest.fixture(scope="module")
def sweep(sweep_env):
    """Two good cells, one diverged, one crashed, then the downstream assets."""
    instance = dg.DagsterInstance.get()
    defs = make_defs()
    results = {}
    for cell in OK:
        results[cell.key] = dg.materialize(
            [asset(defs, "training_run")], partition_key=partition_key(cell), instance=instance
        )
    nan_defs = make_defs(fault="nan@20")
    results[DIVERGED.key] = dg.materialize(
        [asset(nan_defs, "training_run")],
        partition_key=partition_key(DIVERGED),
        instance=instance,
    )
    crash_defs = make_defs(fault="crash@5")
    results[CRASHED.key] = dg.materialize(
        [asset(crash_defs, "training_run")],
        partition_key=partition_key(CRASHED),
        instance=instance,
        raise_on_error=False,
    )
    results["downstream"] = dg.materialize(
        downstream(defs), instance=instance, raise_on_error=False
    )
    return instance, defs, results


def _db() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(data_path("deconflow.duckdb")), read_only=True)


def test_partitions_are_the_grid():
    grid = load_grid()
    pdef = partitions_def(grid)
    keys = pdef.get_partition_keys()
    assert len(keys) == 216
    assert {cell_for(k).key for k in keys} == {c.key for c in grid.cells}
    assert [d.name for d in pdef.partitions_defs] == ["hp", "variant"]


def test_adding_a_grid_value_keeps_existing_partitions():
    data = {
        "variants": ["base", "bn_off", "narrow", "adamw"],
        "lr": [0.05, 0.1, 0.2],
        "weight_decay": [1e-4, 1e-3, 1e-2],
        "seed": [0, 1, 2, 3, 4, 5],
    }
    before = set(partitions_def(grid_from_dict(data)).get_partition_keys())
    data["seed"].append(6)
    data["lr"].append(0.4)
    after = set(partitions_def(grid_from_dict(data)).get_partition_keys())
    assert before < after and len(after) == 4 * 4 * 3 * 7


def test_materialization_carries_the_run_summary(sweep):
    _, _, results = sweep
    mat = results[OK[0].key].asset_materializations_for_node("training_run")[0]
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["outcome"] == "completed" and meta["steps"] == 44
    for k in ("wall_time_s", "final_train_loss", "best_val_ce", "r_squared"):
        assert isinstance(meta[k], float)
    div = results[DIVERGED.key].asset_materializations_for_node("training_run")[0]
    assert div.metadata["outcome"].value == "diverged"


def test_crash_fails_the_partition_with_the_log_tail(sweep):
    instance, _, results = sweep
    res = results[CRASHED.key]
    assert not res.success
    failure = [e for e in res.all_events if e.is_step_failure][0]
    text = str(failure.step_failure_data.error)
    assert "injected crash at step 5" in text and "[unknown]" in text
    run = instance.get_run_by_id(res.run_id)
    assert run.tags["deconflow/failure_class"] == "unknown"


def test_duckdb_tables_hold_the_runs(sweep):
    _, _, results = sweep
    assert results["downstream"].success
    con = _db()
    tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    assert {
        "runs",
        "batch_metrics",
        "val_metrics",
        "curvature_metrics",
        "noise_metrics",
        "run_fits",
        "hypotheses",
        "completeness",
    } <= tables
    per_run = dict(con.execute("SELECT run_id, count(*) FROM batch_metrics GROUP BY 1").fetchall())
    assert per_run == {OK[0].key: 44, OK[1].key: 44, DIVERGED.key: 20}
    assert (
        con.execute("SELECT count(*) FROM val_metrics WHERE run_id = ?", [OK[0].key]).fetchone()[0]
        == 16
    )
    runs = con.execute("SELECT * FROM runs").df().set_index("run_id")
    assert len(runs) == 216
    assert runs.loc[OK[0].key, "status"] == "materialized"
    assert runs.loc[DIVERGED.key, "outcome"] == "diverged"
    assert runs.loc[CRASHED.key, "status"] == "failed"
    assert runs.loc[CRASHED.key, "failure_class"] == "unknown"
    fits = con.execute("SELECT * FROM run_fits").df()
    assert set(fits["run_id"]) == {OK[0].key, OK[1].key, DIVERGED.key}
    assert {
        "r_squared",
        "knee_epoch",
        "burn_in_loss",
        "alpha_early",
        "alpha_full",
        "best_val_ce",
        "best_val_epoch",
    } <= set(fits.columns)
    hyp = con.execute("SELECT * FROM hypotheses").df()
    assert set(hyp["hypothesis"]) == {"H1", "H2"}
    assert set(hyp["scope"]) == {"pooled", "adamw", "base", "bn_off"}  # variants with runs
    comp = con.execute("SELECT status, count(*) FROM completeness GROUP BY 1").fetchall()
    assert dict(comp) == {"materialized": 2, "diverged": 1, "failed": 1, "missing": 212}


def test_pictures_are_on_the_analysis_assets(sweep):
    _, _, results = sweep
    mats = {
        m.asset_key.to_user_string(): m
        for m in results["downstream"].get_asset_materialization_events()
        for m in [m.event_specific_data.materialization]
    }
    for asset_name, key in [
        ("run_fits", "loss_curves"),
        ("run_fits", "r_squared_histogram"),
        ("hypotheses", "alpha_vs_best_val"),
    ]:
        assert "data:image/png;base64," in mats[asset_name].metadata[key].value
    assert mats["run_fits"].metadata["coverage"].value == "3 of 216 cells"


def test_checks_report_completeness_and_quality(sweep):
    _, _, results = sweep
    evals = {e.check_name: e for e in results["downstream"].get_asset_check_evaluations()}
    comp = evals["all_cells_materialized"]
    assert not comp.passed
    assert comp.metadata["missing"].value == 212 and comp.metadata["failed"].value == 1
    assert CRASHED.key in comp.metadata["failed_cells"].value
    qg = evals["quality_gates"]
    assert qg.metadata["verdict"].value == "GO", qg.metadata["gates"].value


def test_export_files(sweep):
    out = data_path("export")
    text = (out / "run_fits.csv").read_text()
    assert "e-" not in text and "e+" not in text
    df = pd.read_csv(out / "run_fits.csv")
    assert len(df) == 3
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["row_count"] == 3 and {c["name"] for c in meta["columns"]} >= {
        "run_id",
        "r_squared",
    }
    assert sorted(p.stem for p in (out / "timeseries").glob("*.parquet")) == sorted(
        [OK[0].key, OK[1].key, DIVERGED.key]
    )


def test_rerun_replaces_rows_without_duplicates(sweep):
    instance, defs, _ = sweep
    res = dg.materialize(
        [asset(defs, "training_run")], partition_key=partition_key(OK[0]), instance=instance
    )
    assert res.success
    assert dg.materialize(downstream(defs), instance=instance, raise_on_error=False).success
    con = _db()
    dups = con.execute(
        "SELECT run_id, step, count(*) c FROM batch_metrics GROUP BY 1, 2 HAVING c > 1"
    ).fetchall()
    assert dups == []
    assert (
        con.execute("SELECT count(*) FROM batch_metrics WHERE run_id = ?", [OK[0].key]).fetchone()[
            0
        ]
        == 44
    )
    assert con.execute("SELECT attempts FROM runs WHERE run_id = ?", [OK[0].key]).fetchone()[0] == 2
