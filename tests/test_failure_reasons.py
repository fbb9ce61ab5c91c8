"""The stored failure reason is the cause's line from the log; causes have their own classes.

Real training processes through LocalProcessResource on a real (temporary) Dagster instance.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import dagster as dg
import pytest

from deconflow.assets.training import build_training_run
from deconflow.failures import classify_returncode, failure_line
from deconflow.partitions import partition_key
from deconflow.protocol import FAILURE_CLASS_TAG, FAILURE_REASON_TAG
from deconflow.resources import LocalProcessResource, SweepSettings
from deconflow.sweep import load_grid
from tests.helpers import wait_until

pytestmark = pytest.mark.slow  # trains through Dagster

GRID = load_grid()
CELL = GRID.cells[0]


def _materialize(instance, overrides: dict) -> dg.DagsterRun:
    res = dg.materialize(
        [build_training_run(GRID)],
        partition_key=str(partition_key(CELL)),
        resources={
            "compute": LocalProcessResource(),
            "sweep": SweepSettings(profile="demo", overrides_json=json.dumps(overrides)),
        },
        instance=instance,
        raise_on_error=False,
    )
    assert not res.success
    return instance.get_run_by_id(res.run_id)


def test_a_crash_is_stored_with_its_exception_line(instance) -> None:
    run = _materialize(instance, {"epochs": 2, "fault": "crash@5"})
    assert run.tags[FAILURE_REASON_TAG] == "RuntimeError: injected crash at step 5"
    assert run.tags[FAILURE_CLASS_TAG] == "unknown"


def test_a_sigkilled_training_is_killed_by_signal(instance, tmp_path) -> None:
    work = tmp_path / "data" / "work" / CELL.key

    def training_pid() -> int | None:
        try:
            beat = json.loads((work / "heartbeat.json").read_text())
        except (OSError, ValueError):
            return None
        return int(beat["pid"]) if beat.get("step", 0) >= 3 else None

    def kill_when_training() -> None:
        os.kill(wait_until(training_pid, 120, "step 3", every=0.1), signal.SIGKILL)

    t = threading.Thread(target=kill_when_training, daemon=True)
    t.start()
    run = _materialize(instance, {"epochs": 2, "heartbeat_every_s": 0, "fault": "hang@6"})
    t.join(5)
    assert run.tags[FAILURE_CLASS_TAG] == "killed_by_signal", run.tags
    assert run.tags[FAILURE_REASON_TAG] == "process killed by signal SIGKILL (9)"


def test_cause_lines_and_return_codes() -> None:
    tail = "\n".join(
        [
            "progress step 4/22 epoch 0.36 train_loss 2.1 val_loss 2.2",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in <module>',
            "OSError: [Errno 28] No space left on device: 'data/work/c/batch_metrics.parquet'",
        ]
    )
    assert failure_line(tail).startswith("OSError: [Errno 28] No space left on device")
    assert classify_returncode(1, tail) == ("disk_full", "process ended with exit code 1")
    assert classify_returncode(-9, "") == (
        "killed_by_signal",
        "process killed by signal SIGKILL (9)",
    )
    slurm = "slurmstepd: error: *** JOB 7 ON localhost CANCELLED AT 2026 DUE TO TIME LIMIT ***"
    assert failure_line(f"progress step 3\n{slurm}\n") == slurm
    assert failure_line("progress step 3\n") == ""
