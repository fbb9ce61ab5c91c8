"""Retry policies per failure class (SPEC section 7), as pure functions of a cell's run history.

Nothing here talks to Dagster or SLURM, so every rule is unit-testable: the watchdog sensor
(:mod:`deconflow.sensors.watchdog`) turns run records into :class:`RunInfo` histories, asks
:func:`decide` what to do, and carries the decision out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from deconflow.failures import (
    CANCELLED,
    CONFIG_ERROR,
    CORRUPT_CHECKPOINT,
    DISK_FULL,
    DIVERGED,
    NODE_FAIL,
    OOM,
    ORCHESTRATOR_LOST,
    PREEMPTED,
    STUCK,
    SUBMIT_REJECTED,
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
    cell_key_of_tags,
)
from deconflow.protocol import (
    CANCELLED as RUN_CANCELLED,
)

# Classes that resume from the latest checkpoint: the work done so far is sound.
RESUME_CLASSES = frozenset({TIMEOUT, NODE_FAIL, PREEMPTED, STUCK, CANCELLED, ORCHESTRATOR_LOST})
USER_CANCELLED = "user_cancelled"  # the Dagster run was terminated by a person: never retried
# Classes a retry cannot fix: a person must act (settings, sbatch options, disk space) first.
# Each is alerted once and never retried blindly.
NOT_RETRIED = {
    SUBMIT_REJECTED: "sbatch refused the job: fix the SLURM settings, then rerun",
    CONFIG_ERROR: "the run cannot succeed as configured: fix the settings, then rerun",
    DISK_FULL: "free space on the disk named in the reason, then rerun (it resumes)",
}


def _env_float(name: str, default: float) -> float:
    from deconflow import settings

    value = settings.get(name)  # checked there: a one-line error naming the variable
    return default if value is None else value


@dataclass(frozen=True)
class WatchdogSettings:
    """Thresholds and limits; ``from_env`` reads ``DECONFLOW_WATCHDOG_*`` overrides."""

    stuck_after_s: float = 3600.0  # heartbeat age: the training process stopped writing
    # No new training step (the heartbeat's step unchanged) for this long while the run is
    # RUNNING (SLURM) / started (local): a process that lives but makes no progress.
    no_progress_after_s: float = 3600.0
    # The plan's rule of thumb, "running over an hour and still before epoch 5" (of 50),
    # scaled to the run's length: past slow_after_s, a run must be past
    # slow_before_epoch / slow_of_epochs of its steps.
    slow_after_s: float = 3600.0
    slow_before_epoch: float = 5.0
    slow_of_epochs: float = 50.0
    queued_after_s: float = 6 * 3600.0  # reported, never cancelled
    failure_rate_alert: float = 0.10
    min_cells_for_rate: int = 10  # a rate over 2 finished cells says little
    oom_retries: int = 3
    resume_retries: int = 3
    unknown_retries: int = 1  # also killed_by_signal (its own budget)
    corrupt_retries: int = 1  # corrupt_checkpoint: fresh restarts
    confirm_diverged: bool = False  # one confirmation rerun of a diverged run
    interval_s: int = 30
    cursor_cap: int = 2000  # entries per cursor list: the cursor stays small

    @classmethod
    def from_env(cls) -> WatchdogSettings:
        p = "DECONFLOW_WATCHDOG_"
        d = cls()
        return cls(
            stuck_after_s=_env_float(p + "STUCK_AFTER_S", d.stuck_after_s),
            no_progress_after_s=_env_float(p + "NO_PROGRESS_AFTER_S", d.no_progress_after_s),
            slow_after_s=_env_float(p + "SLOW_AFTER_S", d.slow_after_s),
            slow_before_epoch=_env_float(p + "SLOW_BEFORE_EPOCH", d.slow_before_epoch),
            slow_of_epochs=_env_float(p + "SLOW_OF_EPOCHS", d.slow_of_epochs),
            queued_after_s=_env_float(p + "QUEUED_AFTER_S", d.queued_after_s),
            failure_rate_alert=_env_float(p + "FAILURE_RATE", d.failure_rate_alert),
            min_cells_for_rate=int(_env_float(p + "MIN_CELLS_FOR_RATE", d.min_cells_for_rate)),
            oom_retries=int(_env_float(p + "OOM_RETRIES", d.oom_retries)),
            resume_retries=int(_env_float(p + "RESUME_RETRIES", d.resume_retries)),
            unknown_retries=int(_env_float(p + "UNKNOWN_RETRIES", d.unknown_retries)),
            corrupt_retries=int(_env_float(p + "CORRUPT_RETRIES", d.corrupt_retries)),
            confirm_diverged=bool(_env_float(p + "CONFIRM_DIVERGED", d.confirm_diverged)),
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


def decide(
    history: list[RunInfo],
    settings: WatchdogSettings,
    sweep: str,
    cell: str | None = None,
    attempts: int | None = None,
) -> Decision:
    """The per-class policy for a cell whose latest run (``history[0]``) failed.

    Retries are counted per class group (resume classes share one budget) over the failures
    since the cell's last success, so the count survives sensor restarts and cursor resets.
    ``cell`` defaults to the run's cell (or partition) tag: a run that failed before the asset
    body tagged it still belongs to its partition's cell. ``attempts``: the cell's number of
    runs when ``history`` is only its most recent part.
    """
    latest = history[0]
    cls = failure_class(latest)
    reason = latest.tags.get(FAILURE_REASON_TAG) or latest.tags.get(STUCK_TAG) or ""
    failures = [r for r in _since_last_success(history) if _group(failure_class(r)) == _group(cls)]
    n = len(failures)  # this failure included
    cell = cell or cell_key_of_tags(latest.tags) or ""
    base = {
        SWEEP_TAG: sweep,
        CELL_TAG: cell,
        ATTEMPT_TAG: str((attempts or len(history)) + 1),
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
    if cls in NOT_RETRIED:
        return Decision("alert", cls, f"{cls}, not retried ({NOT_RETRIED[cls]}); {reason}")
    if cls == CORRUPT_CHECKPOINT:  # resuming would load it again: start over instead
        if n > settings.corrupt_retries:
            return Decision("alert", cls, f"corrupt checkpoint {n} times; {reason}")
        tags = {**base, **({GRAD_ACCUM_TAG: accum} if accum else {})}
        return Decision(
            "retry",
            cls,
            f"corrupt checkpoint: fresh start, retry {n}/{settings.corrupt_retries}",
            tags,
        )
    limit = settings.resume_retries if cls in RESUME_CLASSES else settings.unknown_retries
    if n > limit:
        return Decision("alert", cls, f"{cls} {n} times, retries exhausted; {reason}")
    tags = {**base, RESUME_TAG: "true", **({GRAD_ACCUM_TAG: accum} if accum else {})}
    return Decision("retry", cls, f"{cls}: resume from checkpoint, retry {n}/{limit}", tags)


class Cursor:
    """The sensor's bounded state: handled failed runs, sent alerts, cancelled stuck runs, the
    progress seen of in-flight runs, and the analysis-failure watermark.

    Each map keeps insertion order and drops its oldest entries past ``cap``; losing an old
    entry is harmless because a handled run is no longer any cell's latest run. ``progress``
    holds only runs in flight (rebuilt every tick), so it is bounded by the run concurrency.
    """

    def __init__(self, text: str | None, cap: int = 2000) -> None:
        data = json.loads(text) if text else {}
        self.cap = cap
        # cell -> [failed run id handled, its class]
        self.handled: dict[str, list] = {
            k: (v if isinstance(v, list) else [v, None]) for k, v in data.get("handled", {}).items()
        }
        self.alerted: dict[str, float] = data.get("alerted", {})  # alert key -> time
        self.cancelled: dict[str, float] = data.get("cancelled", {})  # stuck run id -> time
        self.rate_alerted: bool = data.get("rate_alerted", False)
        # in-flight run id -> [heartbeat step, when it last changed, running since]
        self.progress: dict[str, list] = data.get("progress", {})
        self.analysis_wm: float | None = data.get("analysis_wm")  # update time seen up to

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
                "progress": self.progress,
                "analysis_wm": self.analysis_wm,
            },
            separators=(",", ":"),
        )
