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
FAILURE_CLASSES = (OOM, DIVERGED, TIMEOUT, NODE_FAIL, PREEMPTED, CANCELLED, STUCK, UNKNOWN)

_LOG_PATTERNS: list[tuple[str, re.Pattern]] = [
    (OOM, re.compile(r"CUDA out of memory|OutOfMemoryError|oom-kill|Exceeded job memory limit")),
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
