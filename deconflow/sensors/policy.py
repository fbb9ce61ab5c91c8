"""Retry policies per failure class (SPEC section 7), as pure functions of a cell's run history.

Nothing here talks to Dagster or SLURM, so every rule is unit-testable: the watchdog sensor
(:mod:`deconflow.sensors.watchdog`) turns run records into :class:`RunInfo` histories, asks
:func:`decide` what to do, and carries the decision out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from deconflow.failures import (
    CANCELLED,
    DIVERGED,
    NODE_FAIL,
    OOM,
    ORCHESTRATOR_LOST,
    PREEMPTED,
    STUCK,
    TIMEOUT,
    UNKNOWN,
    classify_slurm_state,
)
from deconflow.protocol import (
    ATTEMPT_TAG,
    CELL_TAG,
    FAILED,
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    GRAD_ACCUM_TAG,
    RESUME_TAG,
    RETRY_CLASS_TAG,
    RETRY_OF_TAG,
    SLURM_STATE_TAG,
    STUCK_TAG,
    SUCCEEDED,
    SWEEP_TAG,
)
from deconflow.protocol import (
    CANCELLED as RUN_CANCELLED,
)

# Classes that resume from the latest checkpoint: the work done so far is sound.
RESUME_CLASSES = frozenset({TIMEOUT, NODE_FAIL, PREEMPTED, STUCK, CANCELLED, ORCHESTRATOR_LOST})
USER_CANCELLED = "user_cancelled"  # the Dagster run was terminated by a person: never retried


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class WatchdogSettings:
    """Thresholds and limits; ``from_env`` reads ``DECONFLOW_WATCHDOG_*`` overrides."""

    stuck_after_s: float = 3600.0  # the plan's rule: no progress for an hour
    queued_after_s: float = 6 * 3600.0  # reported, never cancelled
    failure_rate_alert: float = 0.10
    min_cells_for_rate: int = 10  # a rate over 2 finished cells says little
    oom_retries: int = 3
    resume_retries: int = 3
    unknown_retries: int = 1
    confirm_diverged: bool = False  # one confirmation rerun of a diverged run
    interval_s: int = 30
    cursor_cap: int = 2000  # entries per cursor list: the cursor stays small

    @classmethod
    def from_env(cls) -> WatchdogSettings:
        p = "DECONFLOW_WATCHDOG_"
        d = cls()
        return cls(
            stuck_after_s=_env_float(p + "STUCK_AFTER_S", d.stuck_after_s),
            queued_after_s=_env_float(p + "QUEUED_AFTER_S", d.queued_after_s),
            failure_rate_alert=_env_float(p + "FAILURE_RATE", d.failure_rate_alert),
            min_cells_for_rate=int(_env_float(p + "MIN_CELLS_FOR_RATE", d.min_cells_for_rate)),
            oom_retries=int(_env_float(p + "OOM_RETRIES", d.oom_retries)),
            resume_retries=int(_env_float(p + "RESUME_RETRIES", d.resume_retries)),
            unknown_retries=int(_env_float(p + "UNKNOWN_RETRIES", d.unknown_retries)),
            confirm_diverged=os.environ.get(p + "CONFIRM_DIVERGED", "") in ("1", "true"),
            interval_s=int(_env_float(p + "INTERVAL_S", d.interval_s)),
        )


@dataclass
class RunInfo:
    """What the policies need of one Dagster run."""

    run_id: str
    status: str  # a protocol run state: queued | running | failed | cancelled | succeeded
    tags: dict[str, str] = field(default_factory=dict)
    start_time: float | None = None
    create_time: float | None = None


@dataclass
class Decision:
    """What to do about a cell whose latest run failed."""

    action: str  # retry | alert | none
    failure_class: str
    reason: str
    tags: dict[str, str] = field(default_factory=dict)  # of the retry's RunRequest


def failure_class(run: RunInfo) -> str:
    """The class of a failed run: the watchdog's stuck mark wins, then the run's own tag."""
    if STUCK_TAG in run.tags:
        return STUCK
    cls = run.tags.get(FAILURE_CLASS_TAG)
    if cls:
        return cls
    if run.status == RUN_CANCELLED:
        return USER_CANCELLED  # terminated from the UI/CLI: train_cell tagged nothing
    state = run.tags.get(SLURM_STATE_TAG)
    if state:
        return classify_slurm_state(state) or UNKNOWN
    return UNKNOWN


def _since_last_success(history: list[RunInfo]) -> list[RunInfo]:
    """The failed runs since the cell last succeeded (history is newest first)."""
    out = []
    for run in history:
        if run.status == SUCCEEDED:
            break
        if run.status in (FAILED, RUN_CANCELLED):
            out.append(run)
    return out


def _group(cls: str) -> str:
    return "resume" if cls in RESUME_CLASSES else cls


def decide(history: list[RunInfo], settings: WatchdogSettings, sweep: str) -> Decision:
    """The per-class policy for a cell whose latest run (``history[0]``) failed.

    Retries are counted per class group (resume classes share one budget) over the failures
    since the cell's last success, so the count survives sensor restarts and cursor resets.
    """
    latest = history[0]
    cls = failure_class(latest)
    reason = latest.tags.get(FAILURE_REASON_TAG) or latest.tags.get(STUCK_TAG) or ""
    failures = [r for r in _since_last_success(history) if _group(failure_class(r)) == _group(cls)]
    n = len(failures)  # this failure included
    cell = latest.tags.get(CELL_TAG, "")
    base = {
        SWEEP_TAG: sweep,
        CELL_TAG: cell,
        ATTEMPT_TAG: str(len(history) + 1),
        RETRY_OF_TAG: latest.run_id,
        RETRY_CLASS_TAG: cls,
    }
    accum = latest.tags.get(GRAD_ACCUM_TAG)
    if cls == USER_CANCELLED:
        return Decision("none", cls, "the run was terminated by a person; not retried")
    if cls == OOM:
        if n > settings.oom_retries:
            return Decision("alert", cls, f"out of memory {n} times; {reason}")
        doubled = 2 * int(accum or 1)
        return Decision(
            "retry",
            cls,
            f"out of memory: retry {n}/{settings.oom_retries} with grad_accum {doubled}",
            {**base, GRAD_ACCUM_TAG: str(doubled)},
        )
    if cls == DIVERGED:
        if settings.confirm_diverged and n == 1:
            tags = {**base, **({GRAD_ACCUM_TAG: accum} if accum else {})}
            return Decision("retry", cls, "diverged: one confirmation rerun", tags)
        return Decision("alert", cls, f"diverged (a result, not retried); {reason}")
    limit = settings.resume_retries if cls in RESUME_CLASSES else settings.unknown_retries
    if n > limit:
        return Decision("alert", cls, f"{cls} {n} times, retries exhausted; {reason}")
    tags = {**base, RESUME_TAG: "true", **({GRAD_ACCUM_TAG: accum} if accum else {})}
    return Decision("retry", cls, f"{cls}: resume from checkpoint, retry {n}/{limit}", tags)


class Cursor:
    """The sensor's bounded state: handled failed runs, sent alerts, cancelled stuck runs.

    Each map keeps insertion order and drops its oldest entries past ``cap``; losing an old
    entry is harmless because a handled run is no longer any cell's latest run.
    """

    def __init__(self, text: str | None, cap: int = 2000) -> None:
        data = json.loads(text) if text else {}
        self.cap = cap
        self.handled: dict[str, str] = data.get("handled", {})  # cell -> failed run id handled
        self.alerted: dict[str, float] = data.get("alerted", {})  # alert key -> time
        self.cancelled: dict[str, float] = data.get("cancelled", {})  # stuck run id -> time
        self.rate_alerted: bool = data.get("rate_alerted", False)

    @staticmethod
    def _trim(d: dict, cap: int) -> dict:
        return d if len(d) <= cap else dict(list(d.items())[-cap:])

    def dumps(self) -> str:
        return json.dumps(
            {
                "handled": self._trim(self.handled, self.cap),
                "alerted": self._trim(self.alerted, self.cap),
                "cancelled": self._trim(self.cancelled, self.cap),
                "rate_alerted": self.rate_alerted,
            },
            separators=(",", ":"),
        )
