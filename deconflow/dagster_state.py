"""What the Dagster instance knows about each cell: latest run status, attempts, failures."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import dagster as dg

from deconflow.atomic import atomic_write_json
from deconflow.failures import CANCELLED as CANCELLED_CLASS
from deconflow.failures import UNKNOWN
from deconflow.protocol import (
    CANCELLED,
    CELL_TAG,
    FAILED,
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    SLURM_JOB_TAG,
    STATE_CACHE,
    SWEEP_TAG,
    cell_state,
    run_state,
)
from deconflow.settings import work_dir


def _state_of(rec) -> dict:
    run = rec.dagster_run
    failure = run.tags.get(FAILURE_CLASS_TAG) or (
        CANCELLED_CLASS if run_state(run.status) == CANCELLED else None
    )
    status = cell_state(run.status)
    if status == FAILED and not failure:
        failure = UNKNOWN
    return {
        "status": status,
        "run_id": run.run_id,
        "failure_class": failure,
        "reason": run.tags.get(FAILURE_REASON_TAG),
        "slurm_job_id": run.tags.get(SLURM_JOB_TAG),
        "created": rec.create_timestamp.timestamp() if rec.create_timestamp else 0.0,
        "updated": rec.update_timestamp.timestamp() if rec.update_timestamp else None,
    }


def partition_states(
    instance: dg.DagsterInstance, sweep: str, cache: Path | None = None
) -> dict[str, dict]:
    """Per cell key: status (running|failed|succeeded) of its latest run, and ``attempts``
    (the number of Dagster runs of the cell).

    Cost follows what changed, not the sweep's history: the states are kept in ``cache`` (a
    JSON file; default under the work folder) with the newest update time seen, and each call
    asks the instance only for the runs updated since then (a minute of overlap absorbs
    clock skew between writers). Training runs carry ``deconflow/sweep`` and
    ``deconflow/cell`` tags (set by the asset and by the sensors' run requests).
    """
    cache = cache or work_dir() / STATE_CACHE
    saved: dict = {}
    try:
        saved = json.loads(cache.read_text())
    except (OSError, ValueError):
        saved = {}
    if saved.get("sweep") != sweep or saved.get("instance") != _instance_id(instance):
        saved = {}
    cells: dict[str, dict] = saved.get("cells", {})
    seen: dict[str, list[str]] = saved.get("runs", {})
    cursor = saved.get("cursor")
    filt = dg.RunsFilter(
        tags={SWEEP_TAG: sweep},
        updated_after=dt.datetime.fromtimestamp(cursor - 60, dt.UTC) if cursor else None,
    )
    newest = cursor or 0.0
    for rec in instance.get_run_records(filt, limit=1_000_000):
        key = rec.dagster_run.tags.get(CELL_TAG)
        if not key:
            continue
        ids = seen.setdefault(key, [])
        if rec.dagster_run.run_id not in ids:
            ids.append(rec.dagster_run.run_id)
        state = _state_of(rec)
        if state["updated"]:
            newest = max(newest, state["updated"])
        old = cells.get(key)
        if old is None or (state["created"], state["run_id"]) >= (old["created"], old["run_id"]):
            cells[key] = state
    for key, st in cells.items():
        st["attempts"] = len(seen.get(key, [])) or 1
    payload = {
        "sweep": sweep,
        "instance": _instance_id(instance),
        "cursor": newest,
        "cells": cells,
        "runs": seen,
    }
    try:
        atomic_write_json(cache, payload)
    except OSError:
        pass  # a read-only data folder: the states are right, only the next call pays more
    return {k: dict(v) for k, v in cells.items()}


def _instance_id(instance: dg.DagsterInstance) -> str:
    """Which instance the cache belongs to (a new DAGSTER_HOME or database starts afresh)."""
    return str(getattr(instance, "root_directory", "")) + "|" + type(instance.run_storage).__name__
