"""The watchdog sensor: failed and stuck partitions, classified retries, alerts.

One tick = two run-record queries (the sweep's runs, and all in-progress runs so that a
queued backfill run without deconflow tags still counts as busy), one heartbeat read per
running cell, then :func:`deconflow.sensors.policy.decide` per newly failed cell. It needs
no daemon to be tested: :func:`evaluate_tick` is a plain function of an instance and a cursor.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from deconflow.protocol import (
    ALERT_TAG,
    CANCELLED,
    CELL_TAG,
    FAILED,
    HEARTBEAT,
    IN_PROGRESS_STATES,
    QUEUED,
    RUN_STATES,
    SLURM_STATE_TAG,
    STUCK_TAG,
    SWEEP_TAG,
    TRAIN_LOG,
    cell_key_of_tags,
    partition_key_str,
    run_state,
)
from deconflow.resources.compute import ComputeResource, log_tail
from deconflow.sensors.alerts import AlertWebhook
from deconflow.sensors.policy import (
    USER_CANCELLED,
    Cursor,
    RunInfo,
    WatchdogSettings,
    decide,
    failure_class,
)
from deconflow.settings import work_dir
from deconflow.sweep import Grid, parse_key

_IN_PROGRESS = [dg.DagsterRunStatus(k) for k, v in RUN_STATES.items() if v in IN_PROGRESS_STATES]


@dataclass
class TickReport:
    """What one tick found and did (the sensor turns it into a SensorResult)."""

    requests: list[dg.RunRequest] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    cancelled: list[dict] = field(default_factory=list)  # stuck runs whose job was cancelled
    queued: list[dict] = field(default_factory=list)  # queued too long: reported only
    failure_rate: float = 0.0
    cells_in_play: int = 0
    lines: list[str] = field(default_factory=list)
    cursor: str = ""

    def summary(self) -> str:
        head = (
            f"{self.cells_in_play} cells in play, failure rate {self.failure_rate:.1%}, "
            f"{len(self.requests)} retries, {len(self.cancelled)} stuck cancelled, "
            f"{len(self.alerts)} alerts"
        )
        return "\n".join([head, *self.lines])


def _run_info(rec) -> RunInfo:
    run = rec.dagster_run
    created = rec.create_timestamp.timestamp() if rec.create_timestamp else None
    return RunInfo(run.run_id, run_state(run.status), dict(run.tags), rec.start_time, created)


def read_histories(
    instance: dg.DagsterInstance, sweep: str
) -> tuple[dict[str, list[RunInfo]], set[str]]:
    """Per cell key its runs, newest first; and the cells with any run in progress."""
    histories: dict[str, list[RunInfo]] = {}
    for rec in instance.get_run_records(dg.RunsFilter(tags={SWEEP_TAG: sweep}), limit=100_000):
        cell = rec.dagster_run.tags.get(CELL_TAG)
        if cell:
            histories.setdefault(cell, []).append(_run_info(rec))
    busy = set()
    for rec in instance.get_run_records(dg.RunsFilter(statuses=_IN_PROGRESS), limit=10_000):
        cell = cell_key_of_tags(rec.dagster_run.tags)
        if cell:
            busy.add(cell)
    return histories, busy


def last_progress(work: Path, run: RunInfo) -> float:
    """When the run last made training progress: its heartbeat, but not before it started."""
    started = run.start_time or run.create_time or 0.0
    try:
        beat = float(json.loads((work / HEARTBEAT).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        beat = 0.0
    return max(beat, started)


def cancel_job(run: RunInfo, compute: ComputeResource | None) -> str:
    """Stop a stuck run's training through the compute resource that started it."""
    if compute is None:
        return "no compute resource: nothing cancelled"
    return compute.cancel_run_job(run.tags)


def _alert(kind: str, cell: str, run: RunInfo | None, cls: str, attempts: int, reason: str):
    tail = log_tail(work_dir() / cell / TRAIN_LOG, 20) if cell else ""
    return {
        "kind": kind,
        "partition": partition_key_str(parse_key(cell)) if cell else None,
        "cell": cell or None,
        "class": cls,
        "attempts": attempts,
        "reason": reason,
        "last_log_lines": tail.splitlines(),
        "run_id": run.run_id if run else None,
    }


def evaluate_tick(
    instance: dg.DagsterInstance,
    sweep: str,
    cursor: str | None,
    settings: WatchdogSettings,
    compute: ComputeResource | None = None,
    alerts: AlertWebhook | None = None,
    now: float | None = None,
) -> TickReport:
    """One watchdog tick: detect, act (cancel stuck jobs, alert), and build the run requests."""
    now = time.time() if now is None else now
    cur = Cursor(cursor, settings.cursor_cap)
    rep = TickReport()
    histories, busy = read_histories(instance, sweep)
    requested: set[str] = set()
    failed_cells = 0

    def raise_alert(alert: dict, key: str) -> None:
        if key in cur.alerted:
            return
        cur.alerted[key] = now
        rep.alerts.append(alert)
        rep.lines.append(f"ALERT {alert['kind']} {alert['cell'] or ''}: {alert['reason']}")
        if alert["run_id"]:
            instance.add_run_tags(
                alert["run_id"], {ALERT_TAG: f"{alert['kind']}: {alert['reason']}"[:250]}
            )
        err = alerts.post(alert) if alerts is not None else None
        if err:
            rep.lines.append(err)

    for cell, history in histories.items():
        latest = history[0]
        if latest.status in IN_PROGRESS_STATES:
            busy.add(cell)
            pending = latest.status == QUEUED or latest.tags.get(SLURM_STATE_TAG) == "PENDING"
            if pending:
                since = latest.start_time or latest.create_time or now
                if now - since > settings.queued_after_s:
                    why = f"queued for {now - since:.0f}s (reported, not cancelled)"
                    rep.queued.append({"cell": cell, "run_id": latest.run_id, "for_s": now - since})
                    raise_alert(
                        _alert("queued", cell, latest, "queued", len(history), why),
                        f"queued:{latest.run_id}",
                    )
                continue
            if latest.run_id in cur.cancelled:
                continue  # cancelled on an earlier tick; the run worker has yet to notice
            idle = now - last_progress(work_dir() / cell, latest)
            if idle > settings.stuck_after_s:
                reason = f"no training progress for {idle:.0f}s"
                instance.add_run_tags(latest.run_id, {STUCK_TAG: reason})
                what = cancel_job(latest, compute)
                cur.cancelled[latest.run_id] = now
                rep.cancelled.append({"cell": cell, "run_id": latest.run_id, "action": what})
                rep.lines.append(f"STUCK {cell} run {latest.run_id}: {reason}; {what}")
            continue
        if latest.status not in (FAILED, CANCELLED):
            continue
        cls = failure_class(latest)
        if cls != USER_CANCELLED:
            failed_cells += 1
        if cur.handled.get(cell) == latest.run_id:
            continue
        decision = decide(history, settings, sweep)
        if decision.action == "retry":
            if cell in busy or cell in requested:
                continue  # e.g. a backfill run is queued for it: never a second run
            requested.add(cell)
            rep.requests.append(
                dg.RunRequest(
                    run_key=f"{cell}:{latest.run_id}",
                    partition_key=partition_key_str(parse_key(cell)),
                    tags=decision.tags,
                )
            )
            rep.lines.append(f"RETRY {cell} after run {latest.run_id}: {decision.reason}")
        elif decision.action == "alert":
            reason = decision.reason
            raise_alert(
                _alert("failed", cell, latest, decision.failure_class, len(history), reason),
                f"failed:{latest.run_id}",
            )
        else:
            rep.lines.append(f"NO ACTION {cell} run {latest.run_id}: {decision.reason}")
        cur.handled[cell] = latest.run_id

    rep.cells_in_play = len(histories)
    rep.failure_rate = failed_cells / len(histories) if histories else 0.0
    over = (
        rep.cells_in_play >= settings.min_cells_for_rate
        and rep.failure_rate > settings.failure_rate_alert
    )
    if over and not cur.rate_alerted:
        why = (
            f"sweep failure rate {rep.failure_rate:.1%} of {rep.cells_in_play} cells in play "
            f"is over {settings.failure_rate_alert:.0%}"
        )
        cur.alerted.pop(f"rate:{sweep}", None)
        raise_alert(_alert("failure_rate", "", None, "failure_rate", 0, why), f"rate:{sweep}")
    cur.rate_alerted = over
    rep.cursor = cur.dumps()
    return rep


def build_watchdog_sensor(
    grid: Grid,
    settings: WatchdogSettings | None = None,
    job_name: str = "train_cells",
    name: str = "deconflow_watchdog",
) -> dg.SensorDefinition:
    """The sensor for ``dagster dev`` (running by default); settings default to the env."""
    interval = (settings or WatchdogSettings.from_env()).interval_s

    @dg.sensor(
        name=name,
        job_name=job_name,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Retries failed training partitions by failure class, cancels and resumes stuck "
            "ones, alerts on exhausted retries and a sweep failure rate over the threshold."
        ),
    )
    def watchdog(
        context: dg.SensorEvaluationContext, compute: ComputeResource, alerts: AlertWebhook
    ) -> dg.SensorResult:
        rep = evaluate_tick(
            context.instance,
            grid.name,
            context.cursor,
            settings or WatchdogSettings.from_env(),
            compute,
            alerts,
        )
        for line in rep.lines:
            (context.log.warning if line.startswith(("ALERT", "STUCK")) else context.log.info)(line)
        return dg.SensorResult(
            run_requests=rep.requests,
            cursor=rep.cursor,
            skip_reason=None if rep.requests else rep.summary(),
        )

    return watchdog
