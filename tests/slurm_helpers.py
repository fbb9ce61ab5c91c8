"""Shared helpers of the tests on the dev SLURM cluster (a plain module; the cluster fixture
itself is in conftest.py): job-name prefixes, materializing through SlurmResource, sacct and
squeue probes, a killable materializing child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from deconflow.assets.training import build_training_run
from deconflow.resources.slurm import SlurmResource
from deconflow.resources.sweep_settings import SweepSettings
from deconflow.sweep import Cell, load_grid
from deconflow_dev import slurm_cluster as cluster

REPO = Path(__file__).resolve().parents[1]
HP = "lr0.1_wd0.001_s0"
CELL = Cell("base", 0.1, 0.001, 0)


def cluster_test(fn):
    """Runs against the real local cluster (root only: its daemons run as root)."""
    fn = pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster runs as root")(fn)
    return pytest.mark.slurm(fn)


def _prefix() -> str:
    """A job-name prefix of its own per test, so sacct counts see only that test's jobs."""
    return "t" + uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------- materialize helper


def materialize(
    data: Path,
    slurm: dict,
    overrides: dict,
    hp: str = HP,
    tags: dict | None = None,
) -> dict:
    """Materialize one training_run partition through SLURM; a JSON-able summary of the run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DECONFLOW_DATA", str(data))
        # A persistent instance when DAGSTER_HOME is set (restart tests), else ephemeral.
        if os.environ.get("DAGSTER_HOME"):
            instance = dg.DagsterInstance.get()
        else:
            instance = dg.DagsterInstance.ephemeral()
        res = _materialize(instance, slurm, overrides, hp, tags)
        return _summarize(instance, res)


def _materialize(instance, slurm: dict, overrides: dict, hp: str, tags: dict | None):
    return dg.materialize(
        [build_training_run(load_grid())],
        partition_key=dg.MultiPartitionKey({"variant": "base", "hp": hp}),
        resources={
            "compute": SlurmResource(**slurm),
            "sweep": SweepSettings(profile="demo", overrides_json=json.dumps(overrides)),
        },
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )


def _summarize(instance, res) -> dict:
    out: dict = {"success": res.success, "metadata": {}, "failure": None}
    for ev in res.get_asset_materialization_events():
        md = ev.materialization.metadata
        out["metadata"] = {k: _plain(v.value) for k, v in md.items()}
    for ev in res.all_events:  # the step's dg.Failure, else the first error (e.g. resource init)
        data_ = ev.event_specific_data
        if ev.event_type_value == "STEP_FAILURE" and data_.user_failure_data is not None:
            uf = data_.user_failure_data
            meta = {k: _plain(v.value) for k, v in uf.metadata.items()}
            out["failure"] = {"description": uf.description, "metadata": meta}
            break
        error = getattr(data_, "error", None)
        if error is not None and out["failure"] is None:
            out["failure"] = {"description": error.to_string(), "metadata": {}}
    out["tags"] = dict(instance.get_run_by_id(res.run_id).tags)
    return out


def _plain(v):
    return v if isinstance(v, str | int | float | bool | type(None)) else str(v)


def _child_main() -> None:
    """Entry point of a materializing subprocess (the 'orchestrator' that tests kill)."""
    args = json.loads(sys.argv[1])
    out = materialize(Path(args["data"]), args["slurm"], args["overrides"], tags=args.get("tags"))
    Path(args["result"]).write_text(json.dumps(out))


def start_child(tmp: Path, data: Path, slurm: dict, overrides: dict) -> tuple:
    result = tmp / f"result-{uuid.uuid4().hex[:6]}.json"
    args = {
        "data": str(data),
        "slurm": slurm,
        "overrides": overrides,
        "result": str(result),
    }
    log = open(tmp / f"child-{uuid.uuid4().hex[:6]}.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from tests.slurm_helpers import _child_main; _child_main()",
            json.dumps(args),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "DECONFLOW_DATA": str(data)},
    )
    return proc, result, Path(log.name)


# --------------------------------------------------------------------------- cluster helpers


def _client(*argv: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def sacct_by_name(name: str) -> list[tuple[str, str]]:
    """(job id, state) of every allocation ever named ``name``."""
    out = _client(
        "sacct", "-n", "-P", "-X", "-o", "JobID,State", f"--name={name}", "-S", "now-1day"
    )
    return [tuple(line.split("|")[:2]) for line in out.splitlines() if line.strip()]


def wait_sacct_state(name: str, prefix: str, timeout: float = 60) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    rows: list = []
    while time.monotonic() < deadline:
        rows = sacct_by_name(name)
        if rows and all(state.startswith(prefix) for _, state in rows):
            return rows
        time.sleep(0.5)
    pytest.fail(f"{name}: sacct says {rows}, expected all {prefix}")


def squeue_by_name(name: str) -> list[str]:
    return _client("squeue", "--noheader", f"--name={name}", "--format=%i|%T").split()


def wait_for(what: str, probe, timeout: float = 90, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the materializing process exited ({proc.returncode}) before {what}")
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def heartbeat_step(work: Path) -> int:
    try:
        return int(json.loads((work / "heartbeat.json").read_text())["step"]) + 1
    except (OSError, ValueError, KeyError):
        return 0


def slurm_config(info: cluster.ClusterInfo, prefix: str, **kw) -> dict:
    cfg = {
        "partition": info.partition,
        "time_limit": "00:10:00",
        "mem": "1G",
        "poll_interval_s": 1,
        "slurm_conf": str(info.slurm_conf),
        "job_name_prefix": prefix,
    }
    return {**cfg, **kw}
