"""End-to-end checks of the local one-node SLURM cluster (deconflow_dev.slurm_cluster).

The cluster is brought up once per module and deliberately left up afterwards, because other
SLURM tests reuse it; `test_down_then_up_again` runs last and restores it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from deconflow_dev import slurm_cluster as cluster

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster runs as root"),
]


@pytest.fixture(scope="module")
def slurm() -> cluster.ClusterInfo:
    """The running cluster (started if needed)."""
    return cluster.up()


def _cmd(info: cluster.ClusterInfo, *argv: str, cwd: Path | None = None) -> str:
    """Run a SLURM client with the cluster's env (SLURM_CONF) and return stdout."""
    proc = subprocess.run(
        list(argv),
        env={**os.environ, **cluster.env(info.state_dir)},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0, f"{argv} failed: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _sbatch(info: cluster.ClusterInfo, out_dir: Path, *args: str) -> str:
    return _cmd(
        info, "sbatch", "--parsable", f"--output={out_dir}/slurm-%j.out", *args, cwd=out_dir
    ).strip()


def _sacct_state(info: cluster.ClusterInfo, job_id: str) -> str:
    """The allocation's State from accounting ('' until slurmdbd has the record)."""
    out = _cmd(info, "sacct", "-j", job_id, "-n", "-P", "-X", "-o", "State")
    return out.strip().splitlines()[0] if out.strip() else ""


def _wait_sacct(info: cluster.ClusterInfo, job_id: str, prefix: str, timeout: float = 60) -> str:
    """Poll sacct until the job's state starts with ``prefix``; sacct lags the scheduler."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = _sacct_state(info, job_id)
        if state.startswith(prefix):
            return state
        time.sleep(0.5)
    pytest.fail(f"job {job_id}: sacct state {state!r}, expected {prefix}...")


def _running(info: cluster.ClusterInfo, job_ids: list[str]) -> int:
    out = _cmd(info, "squeue", "-h", "-t", "R", "-o", "%A", "-j", ",".join(job_ids))
    return len(out.split())


def test_status_reports_all_daemons_up(slurm: cluster.ClusterInfo) -> None:
    st = cluster.status(slurm.state_dir)
    assert st["all_up"] and st["up"], st
    assert all(st["daemons"].values())
    assert st["node_state"] in cluster.NODE_OK_STATES  # other tests' jobs may be completing
    assert "gpu" in st["sinfo"]
    assert cluster.env(slurm.state_dir)["SLURM_CONF"] == str(slurm.slurm_conf)
    assert slurm.slurm_conf.is_file()


def test_up_is_idempotent(slurm: cluster.ClusterInfo) -> None:
    again = cluster.up(slurm.state_dir)
    assert again.started == []


def test_gpu_job_completes_and_is_accounted(slurm: cluster.ClusterInfo, tmp_path: Path) -> None:
    job = _sbatch(
        slurm,
        tmp_path,
        "--gres=gpu:1",
        "--cpus-per-task=1",
        "--mem=100M",
        "--wrap",
        "echo $CUDA_VISIBLE_DEVICES; hostname",
    )
    assert _wait_sacct(slurm, job, "COMPLETED") == "COMPLETED"
    out = tmp_path / f"slurm-{job}.out"
    assert out.is_file()
    lines = out.read_text().splitlines()
    assert lines[0] in {str(i) for i in range(slurm.gpus)}, lines  # one fake GPU visible
    assert lines[1]  # hostname
    tres = _cmd(slurm, "sacct", "-j", job, "-n", "-P", "-X", "-o", "AllocTRES")
    assert "gres/gpu=1" in tres


def test_shard_job_completes(slurm: cluster.ClusterInfo, tmp_path: Path) -> None:
    job = _sbatch(
        slurm, tmp_path, "--gres=shard:1", "--mem=100M", "--wrap", "echo $SLURM_SHARDS_ON_NODE"
    )
    assert _wait_sacct(slurm, job, "COMPLETED") == "COMPLETED"
    assert (tmp_path / f"slurm-{job}.out").read_text().strip() == "1"


def test_small_jobs_run_concurrently(slurm: cluster.ClusterInfo, tmp_path: Path) -> None:
    jobs = [
        _sbatch(slurm, tmp_path, "--cpus-per-task=1", "--mem=100M", "--wrap", "sleep 60")
        for _ in range(4)
    ]
    try:
        deadline = time.monotonic() + 30
        while _running(slurm, jobs) < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running(slurm, jobs) == len(jobs)  # 4 one-CPU jobs on a 2-CPU node
    finally:
        _cmd(slurm, "scancel", *jobs)


def test_scancel_is_accounted_as_cancelled(slurm: cluster.ClusterInfo, tmp_path: Path) -> None:
    job = _sbatch(slurm, tmp_path, "--mem=50M", "--wrap", "sleep 300")
    _wait_sacct(slurm, job, "RUNNING", timeout=30)
    _cmd(slurm, "scancel", job)
    assert _wait_sacct(slurm, job, "CANCELLED").startswith("CANCELLED")


@pytest.mark.slurm_exclusive
def test_down_then_up_again(slurm: cluster.ClusterInfo, tmp_path: Path) -> None:
    """Runs last: stops everything, checks nothing is left, and brings the cluster back."""
    cluster.down(slurm.state_dir)
    st = cluster.status(slurm.state_dir)
    assert not any(st["daemons"].values()), st
    assert cluster._our_stray_pids(cluster.Layout(slurm.state_dir)) == []
    cluster.down(slurm.state_dir)  # already down: harmless

    info = cluster.up(slurm.state_dir)
    assert info.started == list(cluster.DAEMONS)
    assert cluster.status(slurm.state_dir)["up"]
    job = _sbatch(slurm, tmp_path, "--gres=gpu:1", "--wrap", "true")
    assert _wait_sacct(slurm, job, "COMPLETED") == "COMPLETED"


def test_slot_counts_come_from_the_environment_at_up(tmp_path: Path, monkeypatch) -> None:
    """The scale benchmark sets the node's GPUs and shards after importing this module: the
    counts are read when the configs are rendered, not frozen at import."""
    monkeypatch.setenv("DECONFLOW_SLURM_GPUS", "8")
    monkeypatch.setenv("DECONFLOW_SLURM_SHARDS", "16")
    monkeypatch.setenv("DECONFLOW_SLURM_CPUS", "16")
    lay = cluster._layout(tmp_path / "s")
    cluster.write_configs(lay)
    conf = lay.slurm_conf.read_text()
    assert "Gres=gpu:8,shard:16" in conf and "CPUs=16" in conf
    gres = lay.gres_conf.read_text()
    assert "nvidia[0-7]" in gres and "Name=shard Count=16" in gres
    assert len(list(lay.dev.glob("nvidia*"))) == 8
