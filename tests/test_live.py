"""The analysis follows the sweep by itself: the ``analysis_refresh`` sensor on a real
instance (throttling, one analysis at a time, failures count, the ``analysis_fresh`` check),
and ``deconflow dev`` with its daemon putting a newly landed cell into DuckDB within 120 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import requests
from dagster._core.test_utils import create_run_for_test

from deconflow.assets.automation import (
    JOB,
    RefreshSettings,
    analysis_runs_in_flight,
    build_refresh_sensor,
    evaluate_refresh,
)
from deconflow.assets.freshness import EVENT_KEY, FRESH_CHECK
from deconflow.partitions import partition_key
from deconflow.protocol import (
    ANALYSIS_KIND,
    CELL_TAG,
    KIND_TAG,
    LAUNCHED_BY_TAG,
    PARTITION_TAG,
    SWEEP_TAG,
)
from deconflow.sweep import Cell, load_grid
from tests.helpers import asset, data_path, free_port, make_defs, wait_until

REPO = Path(__file__).resolve().parents[1]
GRID = load_grid()
SETTINGS = RefreshSettings(tick_s=15, min_interval_s=30, settle_s=10, max_wait_s=60)


def land(instance, i: int) -> float:
    """A training partition lands (its materialization event); returns the time."""
    cell = GRID.cells[i]
    instance.report_runless_asset_event(
        dg.AssetMaterialization("training_run", partition=str(partition_key(cell)))
    )
    return time.time()


def tick(instance, cursor, now):
    result = evaluate_refresh(instance, GRID.name, cursor, now=now, settings=SETTINGS)
    return result, result.cursor


def test_a_burst_of_landings_makes_one_refresh_and_never_two_at_once(instance):
    result, cur = tick(instance, None, time.time())
    assert not result.run_requests and "no training partition" in result.skip_reason.skip_message

    for i in range(5):  # a burst
        t = land(instance, i)
    result, cur = tick(instance, cur, t + 1)
    assert not result.run_requests and "waiting" in result.skip_reason.skip_message
    result, cur = tick(instance, cur, t + 11)
    assert len(result.run_requests) == 1
    req = result.run_requests[0]
    assert req.job_name == JOB and req.tags[KIND_TAG] == ANALYSIS_KIND
    result, cur = tick(instance, cur, t + 12)
    assert not result.run_requests and "requested at" in result.skip_reason.skip_message

    # More landings while that analysis runs: they wait for it, then make one refresh.
    busy = create_run_for_test(
        instance, job_name=JOB, status=dg.DagsterRunStatus.STARTED, tags=dict(req.tags)
    )
    for i in range(5, 8):
        t2 = land(instance, i)
    result, cur = tick(instance, cur, t2 + 100)
    assert not result.run_requests and busy.run_id in result.skip_reason.skip_message
    instance.delete_run(busy.run_id)
    result, cur = tick(instance, cur, t2 + 101)
    assert len(result.run_requests) == 1
    assert result.run_requests[0].run_key != req.run_key

    # A steady stream (a landing every 5 s): the settle wait gives way after max_wait,
    # and requests are at least min_interval apart.
    requested = [t2 + 101]
    start = time.time()
    for k in range(30):
        land(instance, 10 + k)
        now = start + 200 + 5 * k  # simulated clock, 5 s per landing
        result, cur = tick(instance, cur, now)
        if result.run_requests:
            requested.append(now)
    gaps = [b - a for a, b in zip(requested, requested[1:], strict=False)]
    assert gaps and min(gaps) >= SETTINGS.min_interval_s
    assert len(requested) - 1 <= 150 / SETTINGS.min_interval_s + 1


def test_a_failed_analysis_is_tried_once_more(instance):
    t = land(instance, 0)
    result, cur = tick(instance, None, t + 11)
    req = result.run_requests[0]
    create_run_for_test(
        instance, job_name=JOB, status=dg.DagsterRunStatus.FAILURE, tags=dict(req.tags)
    )
    result, cur = tick(instance, cur, t + 100)
    assert not result.run_requests  # not before retry_after_s
    result, cur = tick(instance, cur, t + 11 + SETTINGS.retry_after_s)
    assert len(result.run_requests) == 1 and result.run_requests[0].run_key.endswith("-retry")
    create_run_for_test(
        instance, job_name=JOB, status=dg.DagsterRunStatus.FAILURE, tags=dict(req.tags)
    )
    result, cur = tick(instance, cur, t + 2000)
    assert not result.run_requests  # once: then it waits for new landings (or a person)


def test_a_failed_training_run_refreshes_too(instance):
    t = land(instance, 0)
    result, cur = tick(instance, None, t + 11)
    assert len(result.run_requests) == 1
    cell = GRID.cells[1]
    create_run_for_test(
        instance,
        job_name="train_cells",
        status=dg.DagsterRunStatus.FAILURE,
        tags={SWEEP_TAG: GRID.name, CELL_TAG: cell.key, PARTITION_TAG: str(partition_key(cell))},
    )
    result, cur = tick(instance, cur, time.time() + 60)
    assert len(result.run_requests) == 1, result.skip_reason


def test_analysis_fresh_warns_when_cells_landed_since(instance):
    t = land(instance, 0)
    result, cur = tick(instance, None, t + 1)
    fresh = [e for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert fresh and fresh[0].check_name == FRESH_CHECK and not fresh[0].passed
    assert "never been published" in fresh[0].description

    # The analysis publishes, covering the newest landing.
    newest = instance.fetch_materializations(dg.AssetKey("training_run"), limit=1).records[0]
    instance.report_runless_asset_event(
        dg.AssetMaterialization("sweep_db", metadata={EVENT_KEY: newest.storage_id})
    )
    result, cur = tick(instance, cur, t + 2)
    fresh = [e for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert fresh[0].passed and "up to date" in fresh[0].description
    result, cur = tick(instance, cur, t + 3)
    assert not result.asset_events  # reported only when the answer changes

    land(instance, 1)
    land(instance, 2)
    result, cur = tick(instance, cur, time.time())
    fresh = [e for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)][0]
    assert not fresh.passed and fresh.severity == dg.AssetCheckSeverity.WARN
    assert "2 cell(s) landed since" in fresh.description
    assert GRID.cells[2].key in fresh.metadata["cells_landed_since"].value


def test_sensor_definition_runs_on_the_instance(instance):
    sensor = build_refresh_sensor(GRID)
    land(instance, 0)
    ctx = dg.build_sensor_context(instance=instance, cursor=json.dumps({}))
    result = sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


# --------------------------------------------------------------- the daemon, end to end


@pytest.fixture(scope="module")
def dagster_dev(sweep_env):
    port = free_port()
    log = open(sweep_env / "dagster_dev.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "DECONFLOW_PROFILE": "demo"}
    env["DECONFLOW_TRAIN_OVERRIDES"] = json.dumps({"epochs": 4})
    proc = subprocess.Popen(
        ["deconflow", "dev", "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(f"{url}/server_info", timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        wait_until(answers, 180, f"deconflow dev (log: {log.name})", proc=proc, every=1)
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def _fits_in_duckdb() -> set[str]:
    db = data_path("deconflow.duckdb")
    if not db.exists():
        return set()
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT run_id FROM run_fits").fetchall()}
    finally:
        con.close()


@pytest.mark.slow
def test_dagster_dev_puts_a_newly_landed_cell_into_duckdb_within_120s(dagster_dev):
    """Default settings, the real daemon: nobody launches the analysis."""
    instance = dg.DagsterInstance.get()
    defs = make_defs()
    seen = {}
    for cell in (Cell("base", 0.1, 1e-3, 0), Cell("narrow", 0.05, 1e-2, 4)):
        res = dg.materialize(
            [asset(defs, "training_run")], partition_key=partition_key(cell), instance=instance
        )
        assert res.success
        landed = time.time()
        wait_until(
            lambda k=cell.key: k in _fits_in_duckdb(), 150, f"{cell.key} in run_fits", every=2
        )
        seen[cell.key] = time.time() - landed
        print(f"{cell.key}: in DuckDB run_fits {seen[cell.key]:.0f} s after landing")
    assert max(seen.values()) <= 120, seen

    # let the last analysis run finish (its checks follow)
    wait_until(lambda: not analysis_runs_in_flight(instance), 120, "the analysis run", every=2)
    runs = instance.get_run_records(dg.RunsFilter(tags={KIND_TAG: ANALYSIS_KIND}))
    assert runs and all(r.dagster_run.tags.get(LAUNCHED_BY_TAG) for r in runs)
    # Never two analyses at once.
    spans = sorted((r.start_time, r.end_time or time.time()) for r in runs if r.start_time)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    # The published analysis says it is fresh.
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("sweep_db"), FRESH_CHECK)]
    )
    evaluation = next(iter(check.values())).event.dagster_event.event_specific_data
    assert evaluation.passed, evaluation.description
    # ...and while a cell had landed but was not analysed yet, the UI showed it as behind.
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("sweep_db"), FRESH_CHECK), limit=100
    )
    seen_behind = [
        r.event.dagster_event.event_specific_data.description
        for r in history
        if r.event is not None
        and r.event.dagster_event is not None
        and not r.event.dagster_event.event_specific_data.passed
    ]
    assert any(d.startswith("behind") for d in seen_behind), seen_behind
