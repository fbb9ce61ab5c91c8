"""Restart safety on real components: a stopped or killed orchestrator cancels no training.

The Dagster instance lives in PostgreSQL (a real local server, as in production); the SLURM
tests use the real local cluster. A run worker that is stopped (SIGTERM, what stopping
``dagster dev`` or the daemon does to it) or killed (SIGKILL) leaves its training running;
its run ends FAILURE with class ``orchestrator_lost`` (the killed one through
:mod:`deconflow.orphans`), the watchdog retries it, and the retry re-attaches to the same
training: one SLURM job, never CANCELLED. Only an explicit terminate cancels the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from deconflow.failures import ORCHESTRATOR_LOST
from deconflow.orphans import end_orphans
from deconflow.protocol import FAILURE_CLASS_TAG, LOCAL_PROCESS, RESUME_TAG, TRAIN_LOG
from deconflow.sensors import WatchdogSettings, evaluate_tick
from deconflow.sweep import load_grid
from tests.slurm_helpers import (
    CELL,
    REPO,
    _prefix,
    cluster_test,
    heartbeat_step,
    materialize,
    slurm_config,
    squeue_by_name,
    start_child,
    wait_for,
    wait_sacct_state,
)

pytestmark = pytest.mark.slow  # SLURM, PostgreSQL, dagster dev

GRID = load_grid()


def _sacct_states(name: str) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,State", f"--name={name}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [tuple(line.split("|")[:2]) for line in out.splitlines() if line.strip()]


def _only_run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    runs = instance.get_runs()
    assert len(runs) == 1, [(r.run_id, r.status) for r in runs]
    return runs[0]


def _wait_status(instance, run_id: str, statuses, timeout: float = 60) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run.status in statuses:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} stayed {run.status}")


@cluster_test
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_orchestrator_stop_leaves_the_job_and_the_retry_reattaches(
    slurm_cluster,
    pg_dagster_home,
    tmp_path,
    sig,
) -> None:
    prefix = _prefix()
    name = f"{prefix}-{CELL.key}"
    data = tmp_path / "data"
    work = data / "work" / CELL.key
    cfg = slurm_config(slurm_cluster, prefix)
    overrides = {"epochs": 12}  # long enough to outlive the orchestrator
    proc, _, log = start_child(tmp_path, data, cfg, overrides)
    try:
        wait_for("training to start", lambda: heartbeat_step(work) >= 2, 120, proc)
        job = (work / "slurm" / "job_id").read_text().strip()
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(r.startswith(job + "|") for r in squeue_by_name(name)), log.read_text()[-2000:]

    with dg.DagsterInstance.get() as instance:
        run = _only_run(instance)
        if sig == signal.SIGKILL:
            assert run.status == dg.DagsterRunStatus.STARTED  # nobody was left to end it
            ended = end_orphans(instance, min_age_s=0)
            assert [o.run_id for o in ended] == [run.run_id]
        run = _wait_status(instance, run.run_id, [dg.DagsterRunStatus.FAILURE])
        assert run.tags[FAILURE_CLASS_TAG] == ORCHESTRATOR_LOST
        assert end_orphans(instance, min_age_s=0) == []  # nothing left STARTED

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DECONFLOW_DATA", str(data))
            rep = evaluate_tick(instance, GRID.name, None, WatchdogSettings())
        assert len(rep.requests) == 1, rep.summary()
        retry_tags = rep.requests[0].tags
        assert retry_tags[RESUME_TAG] == "true"

    out = materialize(data, cfg, overrides, tags=retry_tags)
    assert out["success"], out
    assert out["metadata"]["slurm_job_id"] == job and out["metadata"]["slurm_adopted"] is True
    assert wait_sacct_state(name, "COMPLETED") == [(job, "COMPLETED")]
    assert _sacct_states(name) == [(job, "COMPLETED")]  # one job, never CANCELLED


@cluster_test
def test_a_job_that_finished_unwatched_is_reported_not_trained_again(
    slurm_cluster,
    pg_dagster_home,
    tmp_path,
) -> None:
    """The run worker is killed and its job completes before anything retries it: the next
    run of the partition reports that job's results (no second job). A rerun after that
    success trains again (a new job)."""
    prefix = _prefix()
    name = f"{prefix}-{CELL.key}"
    data = tmp_path / "data"
    work = data / "work" / CELL.key
    cfg = slurm_config(slurm_cluster, prefix)
    overrides = {"epochs": 3}
    proc, _, log = start_child(tmp_path, data, cfg, overrides)
    try:
        wait_for("training to start", lambda: heartbeat_step(work) >= 2, 120, proc)
        job = (work / "slurm" / "job_id").read_text().strip()
        proc.kill()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_sacct_state(name, "COMPLETED", timeout=180) == [(job, "COMPLETED")]
    with dg.DagsterInstance.get() as instance:
        lost = _only_run(instance).run_id
        assert [o.run_id for o in end_orphans(instance, min_age_s=0)] == [lost]

    out = materialize(data, cfg, overrides)  # a user's rerun of the partition
    assert out["success"], out
    assert out["metadata"]["slurm_job_id"] == job and out["metadata"]["slurm_adopted"] is True
    assert "outcome" in out["metadata"], out["metadata"]  # from summary.json: no Pipes message
    assert _sacct_states(name) == [(job, "COMPLETED")]  # reported, not trained again

    again = materialize(data, cfg, overrides)  # a rerun after that success: trains anew
    assert again["success"], again
    assert again["metadata"]["slurm_job_id"] != job
    assert [state for _, state in wait_sacct_state(name, "COMPLETED")] == ["COMPLETED"] * 2


@cluster_test
def test_a_job_still_queued_when_its_run_stopped_trains_and_is_reported(
    slurm_cluster,
    pg_dagster_home,
    tmp_path,
) -> None:
    """The orchestrator stops while the job waits in the queue (its run's Pipes context is
    gone by the time it starts): the job trains anyway, and the next run reports it."""
    prefix = _prefix()
    name = f"{prefix}-{CELL.key}"
    data = tmp_path / "data"
    work = data / "work" / CELL.key
    # Held in the queue for 20 s, as a busy cluster would.
    cfg = slurm_config(slurm_cluster, prefix, extra_sbatch_lines=["--begin=now+20"])
    overrides = {"epochs": 2}
    proc, _, log = start_child(tmp_path, data, cfg, overrides)
    try:
        wait_for("the job to queue", lambda: (work / "slurm" / "job_id").exists(), 120, proc)
        job = (work / "slurm" / "job_id").read_text().strip()
        assert any("PENDING" in r for r in squeue_by_name(name))
        proc.send_signal(signal.SIGTERM)  # what stopping the orchestrator does to it
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any("PENDING" in r for r in squeue_by_name(name)), log.read_text()[-2000:]
    assert wait_sacct_state(name, "COMPLETED", timeout=240) == [(job, "COMPLETED")]
    assert "training without it" in (work / TRAIN_LOG).read_text()

    out = materialize(data, cfg, overrides)
    assert out["success"], out
    assert out["metadata"]["slurm_job_id"] == job and out["metadata"]["slurm_adopted"] is True
    assert _sacct_states(name) == [(job, "COMPLETED")]


@cluster_test
def test_explicit_terminate_cancels_the_job(slurm_cluster, pg_dagster_home, tmp_path) -> None:
    """The run is CANCELING (a terminate from the UI or CLI): then, and only then, scancel."""
    prefix = _prefix()
    name = f"{prefix}-{CELL.key}"
    data = tmp_path / "data"
    cfg = slurm_config(slurm_cluster, prefix)
    proc, _, log = start_child(tmp_path, data, cfg, {"epochs": 2, "fault": "hang@5"})
    try:
        wait_for(
            "the job to run", lambda: any("RUNNING" in r for r in squeue_by_name(name)), 90, proc
        )
        with dg.DagsterInstance.get() as instance:
            run = _only_run(instance)
            instance.report_run_canceling(run)  # what Dagster's terminate does first
        proc.send_signal(signal.SIGTERM)  # ... then it interrupts the run worker
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert squeue_by_name(name) == [], log.read_text()[-3000:]
    states = [state for _, state in wait_sacct_state(name, "CANCELLED")]
    assert len(states) == 1 and states[0].startswith("CANCELLED"), states
    assert "run terminated: cancelling" in log.read_text()


# --------------------------------------------------------------------------- local resource


def _local_child(
    tmp: Path, data: Path, epochs: int, name: str = "child"
) -> tuple[subprocess.Popen, Path]:
    """A run worker materializing one partition on the local-process resource."""
    code = (
        "import json, dagster as dg\n"
        "from deconflow.assets.training import build_training_run\n"
        "from deconflow.partitions import partition_key\n"
        "from deconflow.resources import LocalProcessResource, SweepSettings\n"
        "from deconflow.sweep import load_grid, parse_key\n"
        "with dg.DagsterInstance.get() as inst:\n"
        "    dg.materialize([build_training_run(load_grid())],\n"
        f"        partition_key=partition_key(parse_key({CELL.key!r})), instance=inst,\n"
        "        resources={'compute': LocalProcessResource(), 'sweep': SweepSettings(\n"
        f"            profile='demo', overrides_json=json.dumps({{'epochs': {epochs}}}))}},\n"
        "        raise_on_error=False)\n"
    )
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "DECONFLOW_DATA": str(data)},
    )
    return proc, log


def test_local_killed_worker_run_ends_and_the_rerun_reattaches(
    pg_dagster_home, tmp_path, monkeypatch
) -> None:
    """SIGKILL the run worker of a local training: the run does not stay STARTED, the
    training process goes on, a second attempt is refused while the first lives, and the
    rerun after it re-attaches instead of clearing the work folder under it."""
    data = tmp_path / "data"
    work = data / "work" / CELL.key
    monkeypatch.setenv("DECONFLOW_DATA", str(data))
    proc, log = _local_child(tmp_path, data, epochs=40)  # outlives the checks below
    try:
        wait_for("training to start", lambda: heartbeat_step(work) >= 2, 120, proc)
        # A second run of the same partition while the first is alive: refused at once.
        second, second_log = _local_child(tmp_path, data, epochs=40, name="second")
        second.wait(120)
        assert "another attempt of " + CELL.key in second_log.read_text()
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    training = json.loads((work / LOCAL_PROCESS).read_text())["pid"]
    assert Path(f"/proc/{training}").exists(), "the training died with its run worker"

    with dg.DagsterInstance.get() as instance:
        first = [r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
        assert len(first) == 1
        assert [o.run_id for o in end_orphans(instance, min_age_s=0)] == [first[0].run_id]
        run = instance.get_run_by_id(first[0].run_id)
        assert run.status == dg.DagsterRunStatus.FAILURE
        assert run.tags[FAILURE_CLASS_TAG] == ORCHESTRATOR_LOST

    rerun, rerun_log = _local_child(tmp_path, data, epochs=40, name="rerun")
    assert rerun.wait(300) == 0, rerun_log.read_text()[-3000:]
    with dg.DagsterInstance.get() as instance:
        last = instance.get_runs(limit=1)[0]
        assert last.status == dg.DagsterRunStatus.SUCCESS
        logs = instance.all_logs(last.run_id)
    messages = [e.user_message or "" for e in logs]
    assert any("re-attached to the running training process" in m for m in messages)
    first_steps = [ln for ln in (work / TRAIN_LOG).read_text().splitlines() if " step 11/" in ln]
    assert len(first_steps) == 1, first_steps  # one training process, ever
    summary = json.loads((data / "runs" / CELL.key / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["steps"] == summary["total_steps"]
