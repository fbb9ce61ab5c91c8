"""What the Dagster instance knows about each cell: latest run status, attempts, failures."""

from __future__ import annotations

import dagster as dg

SWEEP_TAG = "deconflow/sweep"
CELL_TAG = "deconflow/cell"

_RUNNING = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}
_FAILED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


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
        status = (
            "running"
            if run.status in _RUNNING
            else "failed"
            if run.status in _FAILED
            else "succeeded"
        )
        states[key] = {
            "status": status,
            "run_id": run.run_id,
            "attempts": 1,
            "failure_class": run.tags.get("deconflow/failure_class")
            or ("cancelled" if run.status == dg.DagsterRunStatus.CANCELED else None),
            "reason": run.tags.get("deconflow/failure_reason"),
            "slurm_job_id": run.tags.get("deconflow/slurm_job_id"),
            "updated": rec.update_timestamp.timestamp() if rec.update_timestamp else None,
        }
    for st in states.values():
        if st["status"] == "failed" and not st["failure_class"]:
            st["failure_class"] = "unknown"
    return states
