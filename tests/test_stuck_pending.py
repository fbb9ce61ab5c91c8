"""A SLURM job queued ahead of a free slot is never stuck, however long it waits; a running
one whose heartbeat stopped still is."""

from __future__ import annotations

from deconflow.protocol import RUNNING, SLURM_STATE_TAG
from deconflow.sensors.history import stuck_reason
from deconflow.sensors.policy import RunInfo, WatchdogSettings

NOW = 1_000_000.0
HOURS_AGO = NOW - 3 * 3600


def run(state: str) -> RunInfo:
    return RunInfo("r1", RUNNING, {SLURM_STATE_TAG: state}, HOURS_AGO, HOURS_AGO)


def test_a_job_pending_for_hours_is_not_stuck():
    reason, _ = stuck_reason(run("PENDING"), {}, None, WatchdogSettings(), NOW)
    assert reason is None


def test_a_running_job_without_heartbeat_for_hours_is_stuck():
    reason, _ = stuck_reason(run("RUNNING"), {}, None, WatchdogSettings(), NOW)
    assert reason and "no heartbeat" in reason
