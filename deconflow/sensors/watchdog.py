"""The watchdog sensor: failed and stuck partitions, classified retries, alerts.

A tick's cost does not grow with the sweep's history. It reads:

- the latest run of every cell from :mod:`deconflow.run_index` (the index that `deconflow
  status` and the ``runs`` table read too; it asks the instance only for the runs updated
  since its last look), the runs in flight with their tags;
- one heartbeat read per run in flight, for the stuck rules (heartbeat age, no new step, the
  plan's "over an hour and still before epoch 5");
- the recent history of each cell whose latest run newly failed (one tag query per such cell;
  a handled failure is remembered in the cursor with its class, never read again);
- failed analysis runs since a watermark in the cursor.

A run that failed before the asset body tagged its cell (a resource that failed to start,
sbatch refusing the job) is tied to its cell by its partition; its class and reason are read
from its failure events and written onto its tags. :func:`evaluate_tick` is a plain function of
an instance and a cursor: it needs no daemon to be tested.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dagster as dg

from deconflow.keys import partition_of_cell_key
from deconflow.protocol import (
    ALERT_TAG,
    ANALYSIS_JOB,
    ANALYSIS_KIND,
    CANCELLED,
    CELL_TAG,
    FAILED,
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    IN_PROGRESS_STATES,
    KIND_TAG,
    LIVE_STATUSES,
    PARTITION_TAG,
    QUEUED,
    SLURM_STATE_TAG,
    STARTED_STATUSES,
    STUCK_TAG,
    SUCCEEDED,
    SWEEP_TAG,
    TRAIN_LOG,
    TRAINING_ASSET,
    TRAINING_JOB,
    run_state,
)
from deconflow.resources.compute import ComputeResource, log_tail
from deconflow.run_index import LatestRun, latest_runs
from deconflow.sensors.alerts import AlertWebhook
from deconflow.sensors.history import (
    cell_history,
    failure_from_events,
    heartbeat_of,
    stuck_reason,
    ts_of,
)
from deconflow.sensors.policy import (
    USER_CANCELLED,
    Cursor,
    RunInfo,
    WatchdogSettings,
    decide,
    failure_class,
)
from deconflow.settings import work_dir
from deconflow.sweep import Grid, GridError, parse_key

ANALYSIS_LOOKBACK_S = 86400.0  # on a fresh cursor, analysis failures of the last day alert
ANALYSIS_BATCH = 200  # failed unpartitioned runs read per tick
ANALYSIS_OVERLAP_S = 60.0  # the watermark trails the tick by this much


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


def cancel_job(run: RunInfo, compute: ComputeResource | None) -> str:
    """Stop a stuck run's training through the compute resource that started it."""
    if compute is None:
        return "no compute resource: nothing cancelled"
    return compute.cancel_run_job(run.tags)


def _alert(kind: str, cell: str, run: RunInfo | None, cls: str, attempts: int, reason: str):
    tail = log_tail(work_dir() / cell / TRAIN_LOG, 20) if cell else ""
    return {
        "kind": kind,
        "partition": partition_of_cell_key(cell) if cell else None,
        "cell": cell or None,
        "class": cls,
        "attempts": attempts,
        "reason": reason,
        "last_log_lines": tail.splitlines(),
        "run_id": run.run_id if run else None,
    }


def is_analysis_run(run: dg.DagsterRun) -> bool:
    """A run of the analysis assets: the analysis job, the analysis kind tag, or an asset
    selection with assets other than the training partitions."""
    if PARTITION_TAG in run.tags:
        return False
    if run.job_name == ANALYSIS_JOB or run.tags.get(KIND_TAG) == ANALYSIS_KIND:
        return True
    keys = run.asset_selection or set()
    return any(k.to_user_string() != TRAINING_ASSET for k in keys)


@functools.lru_cache(maxsize=200_000)
def _is_cell(key: str) -> bool:
    """Whether a cell key names a cell (parsed once per process: keys never change)."""
    try:
        parse_key(key)
    except (GridError, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=8)
def _grid_cells(grid: Grid) -> frozenset[str]:
    return frozenset(c.key for c in grid.cells)


def _cells_of(latest: dict[str, LatestRun], grid: Grid | None) -> tuple[int, dict]:
    """The number of cells in play (training partitions, of the grid if given), and the
    latest run of each whose latest run did not succeed (in flight or failed): the only
    ones a tick looks at further."""
    n, active = 0, {}
    keys = _grid_cells(grid) if grid is not None else None
    for cell, lr in latest.items():
        if lr.partition is None:
            continue  # not a training partition's run
        if not (cell in keys if keys is not None else _is_cell(cell)):
            continue
        n += 1
        if run_state(lr.status) != SUCCEEDED:
            active[cell] = lr
    return n, active


def _in_flight_info(lr: LatestRun) -> RunInfo:
    """A run in flight as the policies see it (the index keeps all its tags)."""
    return RunInfo(lr.run_id, run_state(lr.status), dict(lr.tags), lr.started, lr.created)


def _failed_since(
    instance: dg.DagsterInstance, since: float, limit: int = 200
) -> list[tuple[str, float, bool]]:
    """(run id, update time, has no partition) of at most ``limit`` runs that failed after
    ``since``, oldest first (the caller's watermark moves on to the last one read)."""
    after = datetime.fromtimestamp(since, tz=UTC)
    recs = instance.get_run_records(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], updated_after=after),
        limit=limit,
        order_by="update_timestamp",
        ascending=True,
    )
    return [
        (
            r.dagster_run.run_id,
            ts_of(r.update_timestamp) or since,
            PARTITION_TAG not in r.dagster_run.tags,
        )
        for r in recs
    ]


def evaluate_tick(
    instance: dg.DagsterInstance,
    sweep: str,
    cursor: str | None,
    settings: WatchdogSettings,
    compute: ComputeResource | None = None,
    alerts: AlertWebhook | None = None,
    now: float | None = None,
    grid: Grid | None = None,
) -> TickReport:
    """One watchdog tick: detect, act (cancel stuck jobs, alert), and build the run requests.

    ``grid`` limits the cells in play to the grid's (default: every training partition).
    """
    now = time.time() if now is None else now
    cur = Cursor(cursor, settings.cursor_cap)
    rep = TickReport()
    requested: set[str] = set()

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

    in_play, cells = _cells_of(latest_runs(instance), grid)
    # Cells with a run in progress (a run queued behind a failed latest one shows in the
    # cell's history, read below before any retry).
    busy = {c for c, lr in cells.items() if lr.status in LIVE_STATUSES}

    # ---- in flight: queued too long (reported), stuck (cancelled, resumed next tick)
    work = work_dir()
    progress: dict[str, list] = {}
    for cell, lr in cells.items():
        if lr.status not in LIVE_STATUSES:
            continue
        run = _in_flight_info(lr) if lr.status in STARTED_STATUSES else None
        slurm_pending = run is not None and run.tags.get(SLURM_STATE_TAG) == "PENDING"
        if run_state(lr.status) == QUEUED or slurm_pending:
            since = (run.start_time if run else None) or lr.created or now
            if now - since > settings.queued_after_s:
                why = f"queued for {now - since:.0f}s (reported, not cancelled)"
                rep.queued.append({"cell": cell, "run_id": lr.run_id, "for_s": now - since})
                info = run or RunInfo(lr.run_id, QUEUED, {}, None, lr.created)
                raise_alert(_alert("queued", cell, info, "queued", 0, why), f"queued:{lr.run_id}")
            continue
        if run is None or CELL_TAG not in run.tags:
            continue  # not yet in the asset body (resources starting): nothing trains yet
        if lr.run_id in cur.cancelled:
            continue  # cancelled on an earlier tick; the run worker has yet to notice
        reason, entry = stuck_reason(
            run, heartbeat_of(work / cell), cur.progress.get(lr.run_id), settings, now
        )
        if entry is not None:
            progress[lr.run_id] = entry
        if reason:
            instance.add_run_tags(lr.run_id, {STUCK_TAG: reason[:250]})
            what = cancel_job(run, compute)
            cur.cancelled[lr.run_id] = now
            rep.cancelled.append({"cell": cell, "run_id": lr.run_id, "action": what})
            rep.lines.append(f"STUCK {cell} run {lr.run_id}: {reason}; {what}")
    cur.progress = progress  # only runs in flight: bounded by the run concurrency

    # ---- failed latest runs: classify (untagged ones from their events), decide, act
    failed_cells = 0
    for cell, lr in cells.items():
        if run_state(lr.status) not in (FAILED, CANCELLED):
            continue
        handled = cur.handled.get(cell)
        if handled and handled[0] == lr.run_id and handled[1]:
            failed_cells += handled[1] != USER_CANCELLED
            continue
        history, n_runs = cell_history(instance, lr.partition)
        if not history or history[0].run_id != lr.run_id:
            continue  # a newer run appeared since the latest-run query: next tick
        if any(r.status in IN_PROGRESS_STATES for r in history):
            busy.add(cell)  # e.g. a backfill run queued for it: never a second run
        latest = history[0]
        if latest.status == FAILED and not (
            latest.tags.get(FAILURE_CLASS_TAG) or latest.tags.get(STUCK_TAG)
        ):
            # Failed before the asset body could say why (resource init, sbatch refused):
            # its failure events do; the tags make it visible to `deconflow status` too.
            cls, line = failure_from_events(instance, latest.run_id)
            tags = {FAILURE_CLASS_TAG: cls, FAILURE_REASON_TAG: (line or cls)[:250]}
            # Tie it to its cell for every reader (`deconflow status`, the runs table).
            tags.update({SWEEP_TAG: sweep, CELL_TAG: cell})
            instance.add_run_tags(latest.run_id, tags)
            latest.tags.update(tags)
        cls = failure_class(latest)
        failed_cells += cls != USER_CANCELLED
        if handled and handled[0] == lr.run_id:  # handled by an older cursor: class only
            cur.handled[cell] = [lr.run_id, cls]
            continue
        decision = decide(history, settings, sweep, cell=cell, attempts=n_runs)
        if decision.action == "retry":
            if cell in busy or cell in requested:
                continue  # e.g. a backfill run is queued for it: never a second run
            requested.add(cell)
            rep.requests.append(
                dg.RunRequest(
                    run_key=f"{cell}:{latest.run_id}",
                    partition_key=lr.partition,
                    tags=decision.tags,
                )
            )
            rep.lines.append(f"RETRY {cell} after run {latest.run_id}: {decision.reason}")
        elif decision.action == "alert":
            raise_alert(
                _alert("failed", cell, latest, decision.failure_class, n_runs, decision.reason),
                f"failed:{latest.run_id}",
            )
        else:
            rep.lines.append(f"NO ACTION {cell} run {latest.run_id}: {decision.reason}")
        cur.handled[cell] = [latest.run_id, cls]

    # ---- failed analysis runs since the watermark: one alert each
    since = cur.analysis_wm if cur.analysis_wm is not None else now - ANALYSIS_LOOKBACK_S
    failed_runs = _failed_since(instance, since, ANALYSIS_BATCH)
    # Seen up to now (less a margin for writers' clocks and commit lag: a run seen twice is
    # alerted once), unless the batch was full: then up to the last one read.
    wm = failed_runs[-1][1] if len(failed_runs) >= ANALYSIS_BATCH else now - ANALYSIS_OVERLAP_S
    wm = max(since, wm)
    for run_id, _updated, unpartitioned in failed_runs:
        if not unpartitioned:
            continue  # a training partition's run: handled above
        run = instance.get_run_by_id(run_id)
        if run is None or not is_analysis_run(run) or f"analysis:{run_id}" in cur.alerted:
            continue
        cls, line = failure_from_events(instance, run.run_id)
        info = RunInfo(run.run_id, FAILED, dict(run.tags))
        why = f"analysis run ({run.job_name}) failed: {line or cls}"
        raise_alert(_alert("analysis_failed", "", info, cls, 0, why), f"analysis:{run.run_id}")
    cur.analysis_wm = wm

    # ---- the sweep's failure rate
    rep.cells_in_play = in_play
    rep.failure_rate = failed_cells / in_play if in_play else 0.0
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
    job_name: str = TRAINING_JOB,
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
            "Ends runs whose process is gone, retries failed training partitions by failure "
            "class, cancels and resumes stuck ones, alerts on exhausted retries, failed analysis "
            "runs and a sweep failure rate over the threshold."
        ),
    )
    def watchdog(
        context: dg.SensorEvaluationContext, compute: ComputeResource, alerts: AlertWebhook
    ) -> dg.SensorResult:
        from deconflow.orphans import end_orphans

        for o in end_orphans(context.instance):  # runs left STARTED by a dead worker
            context.log.warning(f"ENDED run {o.run_id} ({o.status}): {o.reason}")
        rep = evaluate_tick(
            context.instance,
            grid.name,
            context.cursor,
            settings or WatchdogSettings.from_env(),
            compute,
            alerts,
            grid=grid,
        )
        for line in rep.lines:
            (context.log.warning if line.startswith(("ALERT", "STUCK")) else context.log.info)(line)
        return dg.SensorResult(
            run_requests=rep.requests,
            cursor=rep.cursor,
            skip_reason=None if rep.requests else rep.summary(),
        )

    return watchdog
