"""Runs whose process is gone: no Dagster run stays STARTED after its run worker died.

Dagster's default run launcher cannot check a run worker's health, and in-process runs (the
CLI, the demo, tests) have no monitor at all: a killed orchestrator leaves its runs STARTED
forever, filling the run queue and holding pool slots (the DuckDB writer's among them). This
module finds such runs on this host, by the worker identity the training asset tags (or the
pid of Dagster's "Started process for run" event), and ends them: FAILURE with the reason
(CANCELED when a terminate was already asked for), pool slots freed. The watchdog sensor and
the CLI call it; the failed training runs are then retried by the watchdog, and their still
running training is re-attached by the retry.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import dagster as dg

from deconflow import procs
from deconflow.failures import ORCHESTRATOR_LOST
from deconflow.protocol import FAILURE_CLASS_TAG, FAILURE_REASON_TAG, STARTED_STATUSES, WORKER_TAG

LIVE = [dg.DagsterRunStatus(s) for s in sorted(STARTED_STATUSES)]  # past the queue
ORPHANED = ORCHESTRATOR_LOST  # the failure class of a run ended here: retried, re-attached


@dataclass
class Orphan:
    run_id: str
    status: str
    worker: str
    reason: str


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime"):
                return float(line.split()[1])
    return 0.0


def _engine_pid(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, time) of the run's "Started process for run" engine event, if any."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=20
    ).records
    for rec in records:
        entry = rec.event_log_entry
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        pid = getattr(data, "metadata", {}).get("pid") if data is not None else None
        if pid is not None and "Started process for run" in (entry.user_message or ""):
            return int(pid.value), entry.timestamp
    return None


def _pid_alive_since(pid: int, since: float) -> bool:
    """Whether ``pid`` runs and started no later than ``since`` (else the pid was reused)."""
    ticks = procs.start_time(pid)
    if ticks is None:
        return False
    started = _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    return started <= since + 2.0


def find_orphans(instance: dg.DagsterInstance, min_age_s: float = 5.0) -> list[Orphan]:
    """In-progress runs of this host whose worker process is gone."""
    out = []
    now = time.time()
    for rec in instance.get_run_records(dg.RunsFilter(statuses=LIVE), limit=10_000):
        run = rec.dagster_run
        created = rec.create_timestamp.timestamp() if rec.create_timestamp else now
        if now - created < min_age_s:
            continue  # just launched: its worker may not have reported yet
        ident = run.tags.get(WORKER_TAG)
        if ident:
            alive = procs.alive(ident)
            worker = ident
        else:
            found = _engine_pid(instance, run.run_id)
            if found is None:
                continue  # nothing says which process runs it: leave it to Dagster
            pid, since = found
            alive, worker = _pid_alive_since(pid, since), f"pid {pid}"
        if alive is False:
            reason = f"its run worker ({worker}) is gone: the orchestrator died or was killed"
            out.append(Orphan(run.run_id, run.status.value, worker, reason))
    return out


def end_orphans(instance: dg.DagsterInstance, min_age_s: float = 5.0) -> list[Orphan]:
    """End every orphaned run (FAILURE, or CANCELED if it was being terminated), free its
    pool slots; returns what was ended."""
    ended = find_orphans(instance, min_age_s)
    for o in ended:
        run = instance.get_run_by_id(o.run_id)
        if run is None or run.status not in LIVE:
            continue
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message=o.reason)
        else:
            instance.add_run_tags(
                o.run_id,
                {FAILURE_CLASS_TAG: ORPHANED, FAILURE_REASON_TAG: o.reason[:200]},
            )
            instance.report_run_failed(run, message=o.reason)
        instance.event_log_storage.free_concurrency_slots_for_run(o.run_id)
    return ended
