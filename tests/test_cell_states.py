"""The per-cell state of the sweep from the Dagster instance: latest run wins, attempts count
every run, and a second read asks only for what changed (cost independent of history)."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from deconflow.protocol import CELL_TAG, FAILURE_CLASS_TAG, SWEEP_TAG
from deconflow.run_index import partition_states
from deconflow.sweep import load_grid

GRID = load_grid()
A, B = GRID.cells[0].key, GRID.cells[1].key


def add_run(instance, cell: str, status: dg.DagsterRunStatus, **tags) -> str:
    t = {SWEEP_TAG: GRID.name, CELL_TAG: cell, **tags}
    return create_run_for_test(instance, job_name="train_cells", status=status, tags=t).run_id


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as inst:
        yield inst


def test_latest_run_wins_and_attempts_count_runs(instance, tmp_path) -> None:
    cache = tmp_path / "states.json"
    add_run(instance, A, dg.DagsterRunStatus.FAILURE, **{FAILURE_CLASS_TAG: "oom"})
    add_run(instance, B, dg.DagsterRunStatus.SUCCESS)
    st = partition_states(instance, GRID.name, cache)
    assert st[A]["status"] == "failed" and st[A]["failure_class"] == "oom"
    assert st[B]["status"] == "succeeded" and st[A]["attempts"] == st[B]["attempts"] == 1

    retry = add_run(instance, A, dg.DagsterRunStatus.STARTED)
    st = partition_states(instance, GRID.name, cache)
    assert st[A]["status"] == "running" and st[A]["run_id"] == retry
    assert st[A]["attempts"] == 2 and st[B]["attempts"] == 1

    instance.report_run_failed(instance.get_run_by_id(retry), message="boom")
    st = partition_states(instance, GRID.name, cache)
    assert st[A]["status"] == "failed" and st[A]["failure_class"] == "unknown"
    assert st[A]["attempts"] == 2
    # A fresh read (no cache) agrees with the incremental one.
    assert partition_states(instance, GRID.name, tmp_path / "other.json") == st


def test_second_read_asks_only_for_updated_runs(instance, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "states.json"
    for _ in range(3):
        add_run(instance, A, dg.DagsterRunStatus.SUCCESS)
    partition_states(instance, GRID.name, cache)
    asked = []
    real = instance.get_run_records

    def spy(filters=None, **kw):
        asked.append(filters.updated_after)
        return real(filters=filters, **kw)

    monkeypatch.setattr(instance, "get_run_records", spy)
    st = partition_states(instance, GRID.name, cache)
    assert asked and asked[0] is not None  # an incremental query, not a scan of all runs
    assert st[A]["attempts"] == 3
