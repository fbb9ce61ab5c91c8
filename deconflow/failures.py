"""Failure classes: what went wrong with a run, from its log and its SLURM end state.

The classes drive the retry policies of the sensors (SPEC section 7).
"""

from __future__ import annotations

import re

OOM, DIVERGED, TIMEOUT, NODE_FAIL, PREEMPTED, CANCELLED, STUCK, UNKNOWN = (
    "oom",
    "diverged",
    "timeout",
    "node_fail",
    "preempted",
    "cancelled",
    "stuck",
    "unknown",
)
# The run worker was interrupted or died while its training went on (orchestrator stopped or
# restarted): the next attempt re-attaches to the training, so it is retried like a resume.
ORCHESTRATOR_LOST = "orchestrator_lost"
# Causes named rather than lumped into "unknown" (each has its own policy in sensors/policy.py).
SUBMIT_REJECTED = "submit_rejected"  # sbatch refused the job: bad partition, account, QOS...
KILLED_BY_SIGNAL = "killed_by_signal"  # the training process died of a signal (SIGKILL, ...)
DISK_FULL = "disk_full"  # no space left (or quota) while a run wrote its files
CORRUPT_CHECKPOINT = "corrupt_checkpoint"  # a checkpoint loaded but could not be resumed from
CONFIG_ERROR = "config_error"  # the run cannot succeed as configured (settings, data path)
FAILURE_CLASSES = (
    OOM,
    DIVERGED,
    TIMEOUT,
    NODE_FAIL,
    PREEMPTED,
    CANCELLED,
    STUCK,
    ORCHESTRATOR_LOST,
    SUBMIT_REJECTED,
    KILLED_BY_SIGNAL,
    DISK_FULL,
    CORRUPT_CHECKPOINT,
    CONFIG_ERROR,
    UNKNOWN,
)

_LOG_PATTERNS: list[tuple[str, re.Pattern]] = [
    (OOM, re.compile(r"CUDA out of memory|OutOfMemoryError|oom-kill|Exceeded job memory limit")),
    (
        DISK_FULL,
        re.compile(r"No space left on device|disk full|Disk quota exceeded|\[Errno 28\]"),
    ),
    (
        CORRUPT_CHECKPOINT,
        re.compile(r"corrupt checkpoint|PytorchStreamReader failed", re.IGNORECASE),
    ),
    (
        SUBMIT_REJECTED,
        re.compile(r"Batch job submission failed|sbatch: error|sbatch \S* ?\.\.\. failed"),
    ),
    (
        CONFIG_ERROR,
        re.compile(
            r"CheckpointMismatch|belongs to another config|GridError|SlurmConfigError|DataError"
            r"|DagsterInvalidConfigError|DECONFLOW_COMPUTE must be"
        ),
    ),
    (DIVERGED, re.compile(r"nan loss|inf detected|gradient overflow", re.IGNORECASE)),
    (TIMEOUT, re.compile(r"TimeoutError|DUE TO TIME LIMIT|time limit", re.IGNORECASE)),
    (PREEMPTED, re.compile(r"DUE TO PREEMPTION", re.IGNORECASE)),
    (NODE_FAIL, re.compile(r"DUE TO NODE FAILURE|NODE_FAIL", re.IGNORECASE)),
]

SLURM_STATES: dict[str, str | None] = {
    "COMPLETED": None,
    "FAILED": UNKNOWN,
    "CANCELLED": CANCELLED,
    "TIMEOUT": TIMEOUT,
    "OUT_OF_MEMORY": OOM,
    "NODE_FAIL": NODE_FAIL,
    "PREEMPTED": PREEMPTED,
    "BOOT_FAIL": NODE_FAIL,
    "DEADLINE": TIMEOUT,
}


def classify_log(text: str) -> str:
    """The failure class named by a log's last lines (SPEC section 7 patterns)."""
    for cls, pat in _LOG_PATTERNS:
        if pat.search(text):
            return cls
    return UNKNOWN


def classify_slurm_state(state: str, log_tail: str = "") -> str | None:
    """None for success; else the class. A FAILED job's log may say more (e.g. OOM)."""
    base = state.split()[0].rstrip("+") if state else ""
    cls = SLURM_STATES.get(base, UNKNOWN)
    if cls == UNKNOWN and log_tail:
        return classify_log(log_tail)
    return cls


# A line that names a cause: a Python exception line, or one of the patterns above.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b")
_NOISE = re.compile(r"^(progress step |\s*$|\s+File \"|\s+\^+\s*$)")


def failure_line(text: str, limit: int = 250) -> str:
    """The cause's line of a log tail: the last exception line (``RuntimeError: ...``) or, if
    none, the last line a failure pattern matches (SLURM's ``*** ... DUE TO TIME LIMIT ***``);
    '' when the log names no cause (a process killed by a signal prints nothing)."""
    lines = [ln.strip() for ln in text.splitlines() if not _NOISE.match(ln)]
    for ln in reversed(lines):
        if _EXCEPTION_LINE.match(ln):
            return ln[:limit]
    for ln in reversed(lines):
        if any(pat.search(ln) for _, pat in _LOG_PATTERNS):
            return ln[:limit]
    return ""


def signal_name(signum: int) -> str:
    """``SIGKILL (9)`` for 9."""
    import signal

    try:
        return f"{signal.Signals(signum).name} ({signum})"
    except ValueError:
        return f"signal {signum}"


def classify_returncode(returncode: int, log_tail: str = "") -> tuple[str, str]:
    """(class, message) of a local training process that ended with ``returncode`` != 0.

    The log's cause wins (an OOM, a full disk); a process that died of a signal without saying
    why is ``killed_by_signal``; anything else is ``unknown``.
    """
    cls = classify_log(log_tail) if log_tail else UNKNOWN
    if returncode < 0:
        why = f"process killed by signal {signal_name(-returncode)}"
        return (KILLED_BY_SIGNAL if cls == UNKNOWN else cls), why
    return cls, f"process ended with exit code {returncode}"
