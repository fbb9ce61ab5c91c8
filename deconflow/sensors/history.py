"""What the Dagster instance and the work folders say about a cell's training runs, beyond
its latest run (that is :mod:`deconflow.run_index`): its history, a failed run's cause, and
whether a running one still makes progress."""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path

import dagster as dg

from deconflow.failures import UNKNOWN, classify_log
from deconflow.protocol import HEARTBEAT, PARTITION_TAG, SLURM_STATE_TAG, run_state
from deconflow.sensors.policy import (
    RunInfo,
    WatchdogSettings,
)

HISTORY_LIMIT = 50  # runs read per newly failed cell: retries since its last success fit


def ts_of(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if value.tzinfo is None:  # the run storage keeps naive UTC
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def run_info(rec) -> RunInfo:
    run = rec.dagster_run
    return RunInfo(
        run.run_id,
        run_state(run.status),
        dict(run.tags),
        rec.start_time,
        ts_of(rec.create_timestamp),
    )


def cell_history(
    instance: dg.DagsterInstance, partition: str, limit: int = HISTORY_LIMIT
) -> tuple[list[RunInfo], int]:
    """A partition's most recent runs, newest first, and its number of runs."""
    flt = dg.RunsFilter(tags={PARTITION_TAG: partition})
    recs = instance.get_run_records(flt, limit=limit)
    n = len(recs) if len(recs) < limit else instance.get_runs_count(flt)
    return [run_info(r) for r in recs], n


def failure_from_events(instance: dg.DagsterInstance, run_id: str) -> tuple[str, str]:
    """(class, reason line) of a failed run from its failure events: the class a
    ``TrainingFailed`` declared, else the one its error text names; the reason is the
    deepest cause's first line (``SlurmConfigError: invalid ...``)."""
    types = {
        dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.RESOURCE_INIT_FAILURE,
        dg.DagsterEventType.RUN_FAILURE,
    }
    declared, line, texts = None, "", []
    for rec in instance.get_records_for_run(run_id, of_type=types, limit=20).records:
        event = rec.event_log_entry.dagster_event
        data = event.event_specific_data if event else None
        user = getattr(data, "user_failure_data", None)
        if user is not None:
            value = (user.metadata or {}).get("failure_class")
            declared = declared or (value.value if value is not None else None)
            if user.description:
                texts.append(user.description)
                line = line or user.description.strip().splitlines()[0]
        error = getattr(data, "error", None)
        if error is not None:
            texts.append(error.to_string())
            deepest = error
            while deepest.cause is not None:
                deepest = deepest.cause
            first = deepest.message.strip().splitlines()
            line = line or (first[0] if first else "")
    cls = declared or classify_log("\n".join(texts))
    return cls or UNKNOWN, line


def heartbeat_of(work: Path) -> dict:
    try:
        beat = json.loads((work / HEARTBEAT).read_text())
        return beat if isinstance(beat, dict) else {}
    except (OSError, ValueError):
        return {}


def last_progress(work: Path, run: RunInfo) -> float:
    """When the run last wrote its heartbeat, but not before it started."""
    started = run.start_time or run.create_time or 0.0
    try:
        beat = float(heartbeat_of(work)["time"])
    except (KeyError, TypeError, ValueError):
        beat = 0.0
    return max(beat, started)


def stuck_reason(
    run: RunInfo, beat: dict, entry: list | None, settings: WatchdogSettings, now: float
) -> tuple[str | None, list | None]:
    """Why an in-flight run counts as stuck (None if it does not), and its new progress entry
    ``[heartbeat step, when it last changed, running since]``.

    Three rules: the heartbeat is older than ``stuck_after_s`` (the process stopped writing);
    the heartbeat's step has not changed for ``no_progress_after_s`` while the run is running
    (SLURM RUNNING; a local process once started); and the plan's rule, running for more than
    ``slow_after_s`` and still before ``slow_before_epoch`` of ``slow_of_epochs`` epochs
    (scaled to the run's own length).
    """
    state = run.tags.get(SLURM_STATE_TAG)
    if state == "PENDING":
        # Queued ahead of a free slot (DECONFLOW_SLURM_QUEUE_DEPTH): no training yet, so no
        # heartbeat to miss, however long SLURM keeps it waiting.
        return None, None
    started = run.start_time or run.create_time or now
    try:
        beat_time = float(beat["time"])
    except (KeyError, TypeError, ValueError):
        beat_time = 0.0
    idle = now - max(beat_time, started)
    if idle > settings.stuck_after_s:
        return f"no heartbeat for {idle:.0f}s (no training progress)", entry
    if state is not None and state != "RUNNING":
        return None, None  # configuring, completing, suspended: its clocks start over
    step = beat.get("step")
    if entry is None or entry[0] != step:
        running_since = entry[2] if entry else (started if state is None else now)
        entry = [step, now, running_since]
    still = now - entry[1]
    if still > settings.no_progress_after_s:
        return f"no new training step for {still:.0f}s (still at step {step})", entry
    ran = now - entry[2]
    total = beat.get("total_steps")
    if ran > settings.slow_after_s and isinstance(step, int) and total:
        need = settings.slow_before_epoch / settings.slow_of_epochs  # fraction of the run
        if step / total < need:
            epoch = float(beat.get("epoch") or 0.0)
            epochs = total * epoch / step if step and epoch else None
            where = (
                f"epoch {epoch:.2f} of {epochs:.0f}, rule: epoch {need * epochs:.2f} "
                if epochs
                else f"step {step} of {total}, rule: {need:.0%} of the steps "
            )
            return f"running {ran:.0f}s and still at {where}within {settings.slow_after_s:.0f}s", (
                entry
            )
    return None, entry
