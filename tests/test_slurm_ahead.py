"""``deconflow materialize`` on SLURM submits a cell's job ahead of its Dagster run (issue 25).

The job's start-up (allocation, interpreter, torch) overlaps the run worker's; the job waits for
the run's Pipes files, and the run takes the job over instead of submitting a second one. The
cluster tests use the real local cluster and a real (SQLite) Dagster instance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg

from deconflow.protocol import (
    PIPES_CONTEXT,
    PIPES_DIR,
    PIPES_MESSAGES,
    SLURM_DIR,
    SLURM_JOB_ID,
    SLURM_JOB_TAG,
    SLURM_SUBMITTING,
)
from deconflow.resources.compute import pipes_env
from deconflow.resources.slurm import SlurmResource
from deconflow.training.run import wait_for_pipes
from tests.slurm_helpers import (
    CELL,
    REPO,
    _prefix,
    cluster_test,
    sacct_by_name,
    squeue_by_name,
    wait_for,
    wait_sacct_state,
)

# --------------------------------------------------------------------------- no cluster needed


def test_the_pipes_variables_are_those_the_run_hands_its_training(tmp_path) -> None:
    from dagster_pipes import decode_env_var

    pipes = tmp_path / PIPES_DIR
    pipes.mkdir()
    seen = {}

    @dg.asset
    def probe(context):
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesFileContextInjector(str(pipes / PIPES_CONTEXT)),
            message_reader=dg.PipesFileMessageReader(str(pipes / PIPES_MESSAGES)),
        ) as session:
            seen.update(session.get_bootstrap_env_vars())
        return None

    dg.materialize([probe], raise_on_error=False)
    assert seen
    decoded = {k: decode_env_var(v) for k, v in pipes_env(tmp_path).items()}
    assert decoded == {k: decode_env_var(v) for k, v in seen.items()}


def test_a_job_submitted_ahead_waits_for_both_pipes_files(tmp_path, monkeypatch) -> None:
    for k, v in pipes_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    pipes = tmp_path / PIPES_DIR
    pipes.mkdir()
    assert not wait_for_pipes(0.3)  # nothing yet: gives up after its wait
    (pipes / PIPES_CONTEXT).write_text('{"partial": ')  # a context being written
    (pipes / PIPES_MESSAGES).write_text("")
    assert not wait_for_pipes(0.3)

    def session_opens() -> None:
        time.sleep(0.5)
        (pipes / PIPES_CONTEXT).write_text('{"whole": true}')

    threading.Thread(target=session_opens).start()
    t0 = time.monotonic()
    assert wait_for_pipes(10)
    assert 0.4 < time.monotonic() - t0 < 5


def test_a_cell_attempted_before_is_left_to_its_run(tmp_path) -> None:
    """An earlier attempt's work folder is the run's to judge: nothing is submitted ahead."""
    work = tmp_path / CELL.key
    (work / "checkpoints").mkdir(parents=True)
    res = SlurmResource(partition="gpu", slurm_conf="/nonexistent/slurm.conf")
    assert res.start_ahead(CELL, "demo", {"epochs": 1}, work) is None
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints"]


# --------------------------------------------------------------------------- the real cluster


def _cli(tmp_path: Path, info, prefix: str, epochs: int) -> tuple[list[str], dict]:
    toml = tmp_path / "slurm.toml"
    toml.write_text(
        f'[slurm]\npartition = "{info.partition}"\nmem = "1G"\ntime_limit = "00:10:00"\n'
        f'slurm_conf = "{info.slurm_conf}"\njob_name_prefix = "{prefix}"\npoll_interval_s = 1\n'
    )
    env = {
        **os.environ,
        "DECONFLOW_DATA": str(tmp_path / "data"),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "DECONFLOW_COMPUTE": "slurm",
        "DECONFLOW_SLURM_CONFIG": str(toml),
        "DECONFLOW_PROFILE": "demo",
        "DECONFLOW_TRAIN_OVERRIDES": json.dumps({"epochs": epochs, "hessian_every": 0}),
    }
    env.pop("DECONFLOW_PG_URL", None)
    cmd = [sys.executable, "-m", "deconflow.cli", "materialize", "--key", CELL.key]
    return [*cmd, "--no-analysis"], env


def _run_messages(home: Path, monkeypatch) -> tuple[dg.RunRecord, list[str]]:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        (record,) = instance.get_run_records()
        messages = [e.user_message or "" for e in instance.all_logs(record.dagster_run.run_id)]
        return record, messages


@cluster_test
def test_materialize_submits_the_job_ahead_and_its_run_takes_it_over(
    slurm_cluster, tmp_path, monkeypatch
) -> None:
    prefix = _prefix()
    cmd, env = _cli(tmp_path, slurm_cluster, prefix, epochs=1)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    name = f"{prefix}-{CELL.key}"
    ((job, state),) = sacct_by_name(name)  # one job, not a second submission
    assert state == "COMPLETED"
    work = tmp_path / "data" / "work" / CELL.key
    assert (work / SLURM_DIR / SLURM_JOB_ID).read_text().strip() == job
    # The job was submitted before the run began, and the run took it over ...
    record, messages = _run_messages(tmp_path / "home", monkeypatch)
    assert (work / SLURM_DIR / SLURM_SUBMITTING).stat().st_mtime < record.start_time
    assert any(f"took over SLURM job {job}" in m for m in messages), messages
    assert not any("re-attached" in m for m in messages)
    # ... and its training talked to the run through Pipes (no summary.json fallback).
    assert any("successfully opened dagster pipes" in m for m in messages)
    assert not any("no materialization came through Pipes" in m for m in messages)
    log = (work / "train.log").read_text()
    assert "training without it" not in log and "no Dagster run opened Pipes" not in log
    assert record.dagster_run.tags[SLURM_JOB_TAG] == job


@cluster_test
def test_ctrl_c_right_after_the_submission_ahead_leaves_no_job(
    slurm_cluster, tmp_path, monkeypatch
) -> None:
    prefix = _prefix()
    cmd, env = _cli(tmp_path, slurm_cluster, prefix, epochs=30)
    job_id = tmp_path / "data" / "work" / CELL.key / SLURM_DIR / SLURM_JOB_ID
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as a terminal delivers it: a suite started in the background by a
        # non-interactive shell passes SIGINT on ignored, and Python then keeps it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for("the job submitted ahead", job_id.exists, timeout=120, proc=proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    name = f"{prefix}-{CELL.key}"
    wait_sacct_state(name, "CANCELLED", timeout=60)
    assert squeue_by_name(name) == []
