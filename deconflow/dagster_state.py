"""What the Dagster instance knows about each cell: latest run status, attempts, failures."""

from __future__ import annotations

import dagster as dg

from deconflow.failures import CANCELLED as CANCELLED_CLASS
from deconflow.failures import UNKNOWN
from deconflow.protocol import (
    CANCELLED,
    CELL_TAG,
    FAILED,
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    SLURM_JOB_TAG,
    SWEEP_TAG,
    cell_state,
    run_state,
)


def partition_states(instance: dg.DagsterInstance, sweep: str) -> dict[str, dict]:
    """Per cell key: status (running|failed|succeeded) of its latest run, and attempts.

    One query for the whole sweep: training runs carry ``deconflow/sweep`` and
    ``deconflow/cell`` tags (set by the asset and by the sensors' run requests).
    """
    records = instance.get_run_records(dg.RunsFilter(tags={SWEEP_TAG: sweep}), limit=100_000)
    states: dict[str, dict] = {}
    for rec in records:  # newest first
        run = rec.dagster_run
        key = run.tags.get(CELL_TAG)
        if not key:
            continue
        if key in states:
            states[key]["attempts"] += 1
            continue
        status = cell_state(run.status)
        states[key] = {
            "status": status,
            "run_id": run.run_id,
            "attempts": 1,
            "failure_class": run.tags.get(FAILURE_CLASS_TAG)
            or (CANCELLED_CLASS if run_state(run.status) == CANCELLED else None),
            "reason": run.tags.get(FAILURE_REASON_TAG),
            "slurm_job_id": run.tags.get(SLURM_JOB_TAG),
            "updated": rec.update_timestamp.timestamp() if rec.update_timestamp else None,
        }
    for st in states.values():
        if st["status"] == FAILED and not st["failure_class"]:
            st["failure_class"] = UNKNOWN
    return states
