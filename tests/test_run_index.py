"""One latest-run index: `deconflow status`, the ``runs`` asset and the watchdog see the same
latest run and attempts of every cell, and the index follows new runs, status changes, tags
and deleted runs (fast: a temporary instance, no services)."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
from dagster._core.test_utils import create_run_for_test

from deconflow import run_index
from deconflow.assets.tables import build_table_assets
from deconflow.keys import partition_key_str
from deconflow.partitions import partition_key, partitions_def
from deconflow.protocol import (
    CELL_TAG,
    FAILURE_CLASS_TAG,
    PARTITION_TAG,
    RUNS_ASSET,
    STATE_CACHE,
    SWEEP_TAG,
    TRAINING_ASSET,
)
from deconflow.sensors import WatchdogSettings, evaluate_tick
from deconflow.sensors.watchdog import _cells_of
from deconflow.settings import tables_dir, work_dir
from deconflow.status import live_runs_table
from deconflow.sweep import load_grid

GRID = load_grid()
A, B, C, D = GRID.cells[:4]  # retried and in flight, materialized, failed untagged, never run


@pytest.fixture
def instance(tmp_path, monkeypatch):
    monkeypatch.setenv("DECONFLOW_DATA", str(tmp_path / "data"))
    (tmp_path / "home").mkdir()
    run_index.clear()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as inst:
        yield inst
    run_index.clear()


def add_run(instance, cell, status, tagged: bool = True, **tags) -> str:
    t = {PARTITION_TAG: partition_key_str(cell), **tags}
    if tagged:
        t.update({SWEEP_TAG: GRID.name, CELL_TAG: cell.key})
    return create_run_for_test(instance, job_name="train_cells", status=status, tags=t).run_id


def materialize_cell(instance, cell) -> str:
    """A real materialization of the training partition (a stand-in body), as a run."""

    @dg.asset(name=TRAINING_ASSET, partitions_def=partitions_def(GRID))
    def training_run() -> None:
        return None

    tags = {SWEEP_TAG: GRID.name, CELL_TAG: cell.key}
    res = dg.materialize(
        [training_run], partition_key=partition_key(cell), instance=instance, tags=tags
    )
    return res.run_id


def runs_asset_table(instance) -> pd.DataFrame:
    """The ``runs`` table as its asset writes it."""

    @dg.asset(name=TRAINING_ASSET)
    def training_stub() -> None:
        return None

    assets = [training_stub, *build_table_assets(GRID)]
    dg.materialize(assets, instance=instance, selection=[RUNS_ASSET])
    return pd.read_parquet(tables_dir() / f"{RUNS_ASSET}.parquet")


def views(instance) -> tuple[dict, dict, dict]:
    """Per cell (run id, attempts) as status, the runs asset and the watchdog see them."""
    status = live_runs_table(GRID, instance).set_index("run_id")
    table = runs_asset_table(instance).set_index("run_id")
    _, active = _cells_of(run_index.latest_runs(instance), GRID)
    latest = run_index.latest_runs(instance)

    def of(df, col):
        return {
            k: (r["dagster_run_id"], int(r[col]))
            for k, r in df.iterrows()
            if isinstance(r["dagster_run_id"], str)
        }

    watchdog = {k: (v.run_id, v.attempts) for k, v in latest.items() if v.partition}
    assert set(active) <= set(watchdog)
    return of(status, "attempts"), of(table, "dagster_runs"), watchdog


def test_status_runs_table_and_watchdog_see_the_same_latest_run(instance) -> None:
    first = add_run(instance, A, dg.DagsterRunStatus.FAILURE, **{FAILURE_CLASS_TAG: "oom"})
    done = materialize_cell(instance, B)
    lost = add_run(instance, C, dg.DagsterRunStatus.FAILURE, tagged=False)  # before the body

    status, table, watchdog = views(instance)
    assert status == table == watchdog
    assert status[A.key] == (first, 1) and status[B.key] == (done, 1)
    assert status[C.key] == (lost, 1) and D.key not in status

    retry = add_run(instance, A, dg.DagsterRunStatus.STARTED)
    rep = evaluate_tick(instance, GRID.name, None, WatchdogSettings(stuck_after_s=1e9), grid=GRID)
    assert rep.cells_in_play == 3
    # The watchdog decided on C's latest run (and tagged it with its cell and class).
    assert [r.run_key for r in rep.requests] == [f"{C.key}:{lost}"]
    status, table, watchdog = views(instance)
    assert status == table == watchdog
    assert status[A.key] == (retry, 2) and status[C.key] == (lost, 1)
    df = live_runs_table(GRID, instance).set_index("run_id")
    assert df.loc[A.key, "status"] == "running" and df.loc[C.key, "status"] == "failed"
    assert df.loc[C.key, "failure_class"] == instance.get_run_by_id(lost).tags[FAILURE_CLASS_TAG]

    instance.report_run_failed(instance.get_run_by_id(retry), message="boom")
    status, table, watchdog = views(instance)
    assert status == table == watchdog and status[A.key] == (retry, 2)
    assert live_runs_table(GRID, instance).set_index("run_id").loc[A.key, "status"] == "failed"


def test_a_new_process_reads_the_file_and_only_what_changed(instance, monkeypatch) -> None:
    for _ in range(3):
        add_run(instance, A, dg.DagsterRunStatus.FAILURE)
    before = run_index.latest_runs(instance)
    assert (work_dir() / STATE_CACHE).exists()
    run_index.clear()  # a new process: starts from the file
    asked = []
    real = instance.get_run_records

    def spy(filters=None, **kw):
        asked.append(filters.updated_after)
        return real(filters=filters, **kw)

    monkeypatch.setattr(instance, "get_run_records", spy)
    after = run_index.latest_runs(instance)
    assert asked and all(a is not None for a in asked)  # incremental, not a scan
    assert {k: (v.run_id, v.attempts) for k, v in after.items()} == {
        k: (v.run_id, v.attempts) for k, v in before.items()
    }
    assert after[A.key].attempts == 3


def test_deleted_runs_rebuild_the_index(instance, monkeypatch) -> None:
    monkeypatch.setattr(run_index, "WIDE_S", 0.0)  # the once-a-minute look, at every call
    old = add_run(instance, A, dg.DagsterRunStatus.FAILURE)
    new = add_run(instance, A, dg.DagsterRunStatus.SUCCESS)
    assert run_index.latest_runs(instance)[A.key].run_id == new
    instance.delete_run(new)
    latest = run_index.latest_runs(instance)[A.key]
    assert latest.run_id == old and latest.attempts == 1
    instance.delete_run(old)
    assert A.key not in run_index.latest_runs(instance)


def test_a_run_of_another_sweep_is_not_this_sweeps_state(instance) -> None:
    add_run(instance, A, dg.DagsterRunStatus.SUCCESS)
    create_run_for_test(
        instance,
        job_name="train_cells",
        status=dg.DagsterRunStatus.SUCCESS,
        tags={SWEEP_TAG: "other", CELL_TAG: B.key},
    )
    states = run_index.partition_states(instance, GRID.name)
    assert set(states) == {A.key}
    assert set(run_index.partition_states(instance, "other")) == {B.key}
