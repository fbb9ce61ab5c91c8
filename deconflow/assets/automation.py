"""``analysis_refresh``: the analysis follows the sweep by itself.

Every tick (``DECONFLOW_ANALYSIS_TICK_S``, 15 s) the sensor reads two things from the
instance: the newest ``training_run`` materialization and the newest failed training run of
the sweep. When either moved since the last refresh it requests one run of ``analyse_sweep``
(tagged ``deconflow/kind=analysis``: it is not limited by the training runs' queue), unless

- an analysis run is already queued or running (never two at once; the next tick catches
  up with whatever landed meanwhile),
- the newest landing is younger than ``DECONFLOW_ANALYSIS_SETTLE_S`` (10 s) and the oldest
  unhandled one younger than ``DECONFLOW_ANALYSIS_MAX_WAIT_S`` (60 s): a burst of landings
  makes one refresh, a steady stream one per minute at most,
- the last request is younger than ``DECONFLOW_ANALYSIS_MIN_INTERVAL_S`` (30 s).

An analysis run that failed is tried once more for the same landings after
``DECONFLOW_ANALYSIS_RETRY_AFTER_S`` (300 s), e.g. once a full disk has been cleared.

Between analyses it re-evaluates the ``analysis_fresh`` check (only when its answer changes),
so the UI shows when the analysis is behind. :func:`evaluate_refresh` is a plain function of
an instance, a cursor and a clock: tests drive it without a daemon.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import dagster as dg

from deconflow.assets import freshness
from deconflow.protocol import (
    ANALYSIS_JOB,
    ANALYSIS_KIND,
    IN_PROGRESS_STATES,
    KIND_TAG,
    LAUNCHED_BY_TAG,
    RUN_STATES,
)
from deconflow.sweep import Grid

SENSOR = "analysis_refresh"
JOB = ANALYSIS_JOB
_IN_PROGRESS = [dg.DagsterRunStatus(k) for k, v in RUN_STATES.items() if v in IN_PROGRESS_STATES]


def _env(name: str, default: float) -> float:
    from deconflow import settings

    value = settings.get(name)  # checked there: a one-line SettingError (a ValueError)
    return default if value is None else value


@dataclass(frozen=True)
class RefreshSettings:
    tick_s: float = 15.0
    min_interval_s: float = 30.0
    settle_s: float = 10.0
    max_wait_s: float = 60.0
    retry_after_s: float = 300.0

    @classmethod
    def from_env(cls) -> RefreshSettings:
        return cls(
            tick_s=_env("DECONFLOW_ANALYSIS_TICK_S", cls.tick_s),
            min_interval_s=_env("DECONFLOW_ANALYSIS_MIN_INTERVAL_S", cls.min_interval_s),
            settle_s=_env("DECONFLOW_ANALYSIS_SETTLE_S", cls.settle_s),
            max_wait_s=_env("DECONFLOW_ANALYSIS_MAX_WAIT_S", cls.max_wait_s),
            retry_after_s=_env("DECONFLOW_ANALYSIS_RETRY_AFTER_S", cls.retry_after_s),
        )


def analysis_runs_in_flight(instance: dg.DagsterInstance) -> list[str]:
    """Queued or running analysis runs: ours (tagged) and any run of the analysis job."""
    ids = []
    for flt in (
        dg.RunsFilter(tags={KIND_TAG: ANALYSIS_KIND}, statuses=_IN_PROGRESS),
        dg.RunsFilter(job_name=JOB, statuses=_IN_PROGRESS),
    ):
        ids += [r.dagster_run.run_id for r in instance.get_run_records(flt, limit=5)]
    return sorted(set(ids))


def evaluate_refresh(
    instance: dg.DagsterInstance,
    sweep: str,
    cursor: str | None,
    now: float | None = None,
    settings: RefreshSettings | None = None,
) -> dg.SensorResult:
    now = time.time() if now is None else now
    settings = settings or RefreshSettings.from_env()
    cur = json.loads(cursor) if cursor else {}
    state = freshness.landings(instance, sweep)
    signal = state.signal()
    events = []
    fresh = freshness.fresh_evaluation(instance, sweep, state)
    fresh_key = [fresh.passed, fresh.description]
    if fresh_key != cur.get("fresh"):
        events.append(fresh)
        cur["fresh"] = fresh_key

    def done(skip: str, requests=()) -> dg.SensorResult:
        return dg.SensorResult(
            run_requests=list(requests),
            skip_reason=None if requests else skip,
            cursor=json.dumps(cur, sort_keys=True),
            asset_events=events,
        )

    if signal == [None, None]:
        return done("no training partition has landed or failed yet")
    if signal == cur.get("handled"):
        cur.pop("pending_since", None)
        if fresh.passed:
            return done(f"analysis is up to date ({fresh.description})")
        asked = time.strftime("%H:%M:%S", time.gmtime(cur.get("requested_at", now)))
        last = last_analysis_run(instance)
        if (
            last is not None
            and last.status == dg.DagsterRunStatus.FAILURE
            and cur.get("retried") != signal
            and now - cur.get("requested_at", 0.0) >= settings.retry_after_s
            and not analysis_runs_in_flight(instance)
        ):
            # One more try for the same landings (e.g. after a full disk was cleared).
            cur.update(retried=signal, requested_at=now)
            return done("", [_request(signal, retry=True)])
        return done(f"refresh of these landings requested at {asked} UTC; {fresh.description}")
    pending_since = cur.setdefault("pending_since", now)
    busy = analysis_runs_in_flight(instance)
    if busy:
        return done(f"new landings wait for the analysis run in progress ({busy[0]})")
    newest = max(t for t in (state.at, state.failure_at) if t is not None)
    if now - newest < settings.settle_s and now - pending_since < settings.max_wait_s:
        return done(
            f"a landing {now - newest:.0f}s ago: waiting {settings.settle_s:.0f}s for quiet"
        )
    since = now - cur.get("requested_at", 0.0)
    if since < settings.min_interval_s:
        return done(
            f"last refresh {since:.0f}s ago (at most one per {settings.min_interval_s:.0f}s)"
        )
    cur.update(handled=signal, requested_at=now)
    cur.pop("pending_since", None)
    return done("", [_request(signal)])


def _request(signal: list, retry: bool = False) -> dg.RunRequest:
    key = hashlib.sha1(json.dumps(signal).encode()).hexdigest()[:12]
    return dg.RunRequest(
        run_key=f"analysis-{key}" + ("-retry" if retry else ""),
        job_name=JOB,
        tags={KIND_TAG: ANALYSIS_KIND, LAUNCHED_BY_TAG: SENSOR},
    )


def last_analysis_run(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    recs = instance.get_run_records(dg.RunsFilter(tags={KIND_TAG: ANALYSIS_KIND}), limit=1)
    return recs[0].dagster_run if recs else None


def build_refresh_sensor(grid: Grid) -> dg.SensorDefinition:
    settings = RefreshSettings.from_env()

    @dg.sensor(
        name=SENSOR,
        job_name=JOB,
        minimum_interval_seconds=max(1, int(settings.tick_s)),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Refreshes runs, run_fits, hypotheses, completeness, the DuckDB file, "
        "the export and the report when training partitions land or fail: one analysis "
        "run at a time, a burst of landings makes one refresh. Also re-evaluates the "
        "`analysis_fresh` check on sweep_db between analyses.",
    )
    def analysis_refresh(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return evaluate_refresh(context.instance, grid.name, context.cursor, settings=settings)

    return analysis_refresh
