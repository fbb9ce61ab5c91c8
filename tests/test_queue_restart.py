"""Restart safety with jobs queued ahead (issue 25, item 4), on the real local cluster.

A UI-style backfill through ``dagster dev`` (GraphQL, as the "Materialize all" button) with
one training slot and a SLURM queue depth of 2: one job RUNNING, the next ones PENDING in
SLURM's queue (the jobs ask for the cluster's one ``serial`` license, so they run one at a
time while other tests' jobs share the node). Then the
whole ``dagster dev`` process group is SIGKILLed and started again. Every cell is
materialized exactly once, by exactly one SLURM job, and no job is CANCELLED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import dagster as dg
import pytest

from bench.scale_sweep import LAUNCH_BACKFILL, Orchestrator, free_port, graphql
from deconflow_dev import slurm_cluster as cluster
from tests.slurm_helpers import (
    _prefix,
    cluster_test,
    slurm_config,
)

pytestmark = pytest.mark.slow  # dagster dev on the dev cluster

GRID = """name = "queue-restart"
variants = ["base"]
lr = [0.1, 0.2]
weight_decay = [1e-3]
seed = [0, 1]
"""


def _jobs(prefix: str, env: dict) -> list[tuple[str, str, str]]:
    """(job id, state, name) of this test's jobs, from sacct (every job ever submitted)."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,State,JobName", "-S", "now-1hour"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [tuple(ln.split("|")[:3]) for ln in out.splitlines() if f"|{prefix}-" in ln]
    return rows  # type: ignore[return-value]


def _squeue(prefix: str, env: dict) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%T|%j"], env=env, capture_output=True, text=True
    ).stdout
    return [ln for ln in out.splitlines() if f"|{prefix}-" in ln]


@pytest.mark.slow
@cluster_test
def test_sigkilled_dagster_dev_with_jobs_queued_ahead(
    slurm_cluster,
    pg_dagster_home,
    tmp_path,
    monkeypatch,
) -> None:
    prefix = _prefix()
    data = tmp_path / "data"
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    cfg = slurm_config(
        slurm_cluster,
        prefix,
        extra_sbatch_lines=[f"--licenses={cluster.SERIAL_LICENSE}:1"],
        mem="400M",
    )
    toml = tmp_path / "slurm.toml"
    toml.write_text("[slurm]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
    env_vars = {
        "DECONFLOW_DATA": str(data),
        "DECONFLOW_GRID": str(grid),
        "DECONFLOW_COMPUTE": "slurm",
        "DECONFLOW_SLURM_CONFIG": str(toml),
        "DECONFLOW_TRAINING_SLOTS": "1",
        "DECONFLOW_SLURM_QUEUE_DEPTH": "2",
        "DECONFLOW_PROFILE": "demo",
        "DECONFLOW_TRAIN_OVERRIDES": json.dumps(
            {"epochs": 2, "hessian_every": 0, "heartbeat_every_s": 1.0}
        ),
        "DECONFLOW_WATCHDOG_INTERVAL_S": "10",
        # A run launched just before the SIGKILL never starts: failed (then retried) after
        # 30 s, not the default 180 s.
        "DECONFLOW_RUN_START_TIMEOUT_S": "30",
    }
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    from deconflow.instance import ensure_dagster_home

    ensure_dagster_home()  # renders the run limit: 1 slot + queue depth 2
    env = dict(os.environ)
    port = free_port()
    orch = Orchestrator(env, tmp_path / "dagster_dev.log", port)
    key = dg.AssetKey("training_run")
    try:
        orch.start()
        res = graphql(
            port,
            LAUNCH_BACKFILL,
            {"params": {"assetSelection": [{"path": ["training_run"]}], "allPartitions": True}},
        )
        assert res["data"]["launchPartitionBackfill"]["__typename"] == "LaunchBackfillSuccess"

        # Wait until one job runs and at least one waits in SLURM's queue behind it.
        deadline = time.monotonic() + 240
        seen: list[str] = []
        while time.monotonic() < deadline:
            seen = _squeue(prefix, env)
            states = [ln.split("|")[1] for ln in seen]
            if "RUNNING" in states and "PENDING" in states:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"never RUNNING + PENDING: {seen}\n{orch.log.read_text()[-3000:]}")

        os.killpg(orch.proc.pid, signal.SIGKILL)  # dagster dev and its run workers
        orch.proc.wait(30)
        orch.proc = None
        time.sleep(3)
        assert len(_squeue(prefix, env)) >= 2  # the jobs outlive the orchestrator

        orch.start()
        with dg.DagsterInstance.get() as instance:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if len(instance.get_materialized_partitions(key)) == 4:
                    break
                time.sleep(2)
            done = instance.get_materialized_partitions(key)
            assert len(done) == 4, (done, orch.log.read_text()[-3000:])
            records = instance.fetch_materializations(key, limit=100).records
            parts = [r.event_log_entry.dagster_event.partition for r in records]
            assert sorted(parts) == sorted(set(parts)), parts  # each cell materialized once
    finally:
        if orch.proc is not None:
            os.killpg(orch.proc.pid, signal.SIGINT)
            try:
                orch.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(orch.proc.pid, signal.SIGKILL)

    jobs = _jobs(prefix, env)
    names = [name for _, _, name in jobs]
    assert len(jobs) == 4 and len(set(names)) == 4, jobs  # one submission per cell
    assert all(state == "COMPLETED" for _, state, _ in jobs), jobs  # none CANCELLED
    assert not _squeue(prefix, env)
    assert all((data / "work" / n.removeprefix(prefix + "-")).exists() for n in names)
