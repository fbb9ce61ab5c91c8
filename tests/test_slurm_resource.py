"""SlurmResource against the real local SLURM cluster (no mocked sbatch/squeue/sacct).

The cluster comes from :mod:`deconflow_dev.slurm_cluster` (``.ci/run`` brings it up; the module
fixture calls ``up()``, a no-op when it already runs). Every test uses its own job-name prefix,
so counting a partition's jobs in ``sacct`` only sees that test's jobs. The one slow case (a
one-minute time limit) runs in a background process started by the first cluster test and is
checked by the last one, so it overlaps the rest of the file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from deconflow.profiles import get_profile
from deconflow.protocol import SLURM_JOB_TAG as JOB_ID_TAG
from deconflow.protocol import SLURM_STATE_TAG as STATE_TAG
from deconflow.resources.slurm import SlurmResource
from deconflow.slurm.commands import parse_scontrol as _parse_scontrol
from deconflow.slurm.poller import SlurmPoller
from deconflow.slurm.script import SlurmConfigError, parse_time_limit
from deconflow.sweep import Cell
from deconflow.training.data import load_dataset
from tests.slurm_helpers import (
    CELL,
    _client,
    _prefix,
    cluster_test,
    heartbeat_step,
    materialize,
    sacct_by_name,
    slurm_config,
    squeue_by_name,
    start_child,
    wait_for,
    wait_sacct_state,
)


@pytest.fixture(scope="module")
def timeout_run(slurm_cluster, tmp_path_factory):
    """The slow case, started early in the background: a hung run under a 1-minute limit."""
    tmp = tmp_path_factory.mktemp("timeout")
    prefix = _prefix()
    # No --signal here: SLURM sends it up to a minute early, which would beat the limit.
    cfg = slurm_config(slurm_cluster, prefix, time_limit="00:01:00", signal_before_s=0)
    proc, result, log = start_child(tmp, tmp / "data", cfg, {"epochs": 2, "fault": "hang@5"})
    yield {"proc": proc, "result": result, "log": log, "name": f"{prefix}-{CELL.key}"}
    if proc.poll() is None:
        proc.kill()


# --------------------------------------------------------------------------- no cluster needed


@pytest.mark.parametrize(
    "field,value",
    [
        ("partition", "gpu;touch /tmp/pwned"),
        ("account", "$(touch /tmp/pwned)"),
        ("qos", "normal\n#SBATCH --uid=0"),
        ("job_name_prefix", "dcf`touch /tmp/pwned`"),
        ("mem", "4G; touch /tmp/pwned"),
        ("time_limit", "01:00:00 --wrap=touch"),
        ("extra_sbatch_lines", ["--constraint=a\ntouch /tmp/pwned"]),
        ("gpu_sharing", "mig"),
        ("workers_per_gpu", 3),
    ],
)
def test_config_injection_is_rejected(field, value, tmp_path) -> None:
    res = SlurmResource(**{field: value})
    with pytest.raises(SlurmConfigError) as err:
        res.render_script(CELL, ["python", "-V"], {}, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and (field in msg or "split" in msg), msg
    assert not Path("/tmp/pwned").exists()


def test_bad_partition_fails_the_run_before_submitting(tmp_path) -> None:
    out = materialize(tmp_path, {"partition": "gpu;touch /tmp/pwned"}, {"epochs": 1})
    assert not out["success"]
    assert "invalid SlurmResource.partition 'gpu;touch /tmp/pwned'" in json.dumps(out["failure"])
    assert not Path("/tmp/pwned").exists()
    assert not (tmp_path / "work" / CELL.key / "slurm" / "job.sh").exists()


def test_script_quotes_values_and_keeps_setup_lines_verbatim(tmp_path) -> None:
    res = SlurmResource(
        partition="gpu",
        account="proj-1",
        qos="normal",
        gpus_per_job=1,
        workers_per_gpu=2,
        cpus_per_task=4,
        mem="4G",
        time_limit="1-00:30:00",
        extra_sbatch_lines=["#SBATCH --constraint=rtx8000", "--exclusive"],
        setup_lines=["module load cuda/12.1", "source /opt/venv/bin/activate"],
    )
    nasty = 'it\'s $(touch /tmp/pwned); `id` "x"\nnext'
    script = res.render_script(
        CELL, ["python", "-c", "print('hi there')"], {"DAGSTER_PIPES_CONTEXT": nasty}, tmp_path
    )
    lines = script.splitlines()
    for opt in (
        f"--job-name=dcf-{CELL.key}",
        "--partition=gpu",
        "--account=proj-1",
        "--qos=normal",
        "--gres=shard:1",  # 2 shards per GPU, 2 workers per GPU
        "--cpus-per-task=4",
        "--mem=4G",
        "--time=1-00:30:00",
        "--signal=B:USR1@120",
        f"--output={tmp_path.resolve()}/train.log",
        f"--error={tmp_path.resolve()}/train.log",
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
        "--export=ALL",
        "--constraint=rtx8000",
        "--exclusive",
    ):
        assert f"#SBATCH {opt}" in lines, opt
    assert lines.index("module load cuda/12.1") < lines.index("source /opt/venv/bin/activate")
    assert lines[-1] == "exec python -c 'print('\"'\"'hi there'\"'\"')'"
    # Run the script itself: the quoted value reaches the process intact, nothing executes.
    plain = SlurmResource().render_script(
        CELL, ["printenv", "DAGSTER_PIPES_CONTEXT"], {"DAGSTER_PIPES_CONTEXT": nasty}, tmp_path
    )
    (tmp_path / "job.sh").write_text(plain)
    got = subprocess.run(
        ["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, check=True
    ).stdout
    assert got.split("\n", 1)[1] == nasty + "\n"  # after the "[deconflow] SLURM job" line
    assert not Path("/tmp/pwned").exists()
    assert SlurmResource(workers_per_gpu=2, gpu_sharing="mps", shares_per_gpu=100).gres() == (
        "mps:50"
    )
    assert SlurmResource(gpus_per_job=0).gres() is None
    with pytest.raises(SlurmConfigError, match="working directory|work folder"):
        SlurmResource().render_script(CELL, ["true"], {}, tmp_path / "a b")


def test_time_limit_formats() -> None:
    assert parse_time_limit("30") == 1800
    assert parse_time_limit("30:15") == 1815
    assert parse_time_limit("01:00:00") == 3600
    assert parse_time_limit("2-00") == 2 * 86400
    assert parse_time_limit("1-02:03:04") == 86400 + 7384
    for bad in ("", "1h", "-1", "1:2:3:4", "0"):
        with pytest.raises(SlurmConfigError):
            parse_time_limit(bad)


def test_summary_fallback_when_pipes_said_nothing(tmp_path) -> None:
    """A re-attached job whose materialization message was lost: metadata from summary.json."""
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "job_id").write_text("7\n")
    time.sleep(0.01)
    summary = {"outcome": "completed", "steps": 44, "total_steps": 44, "best_val_ce": 0.5}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    ctx = SimpleNamespace(log=logging.getLogger("test"))
    info = {"job_id": "7", "state": "COMPLETED", "adopted": True}
    implicit = dg.MaterializeResult(asset_key="training_run")
    got = SlurmResource()._complete(implicit, info, tmp_path, ctx)
    assert got.asset_key == dg.AssetKey("training_run")
    assert got.metadata["outcome"] == "completed" and got.metadata["steps"] == 44
    assert got.metadata["slurm_job_id"] == "7" and got.metadata["slurm_adopted"] is True
    # Metadata that did come through Pipes is kept as it is.
    reported = dg.MaterializeResult(asset_key="training_run", metadata={"outcome": "diverged"})
    assert SlurmResource()._complete(reported, info, tmp_path, ctx).metadata["outcome"] == (
        "diverged"
    )


# --------------------------------------------------------------------------- real cluster


@pytest.mark.usefixtures("timeout_run")  # starts the slow time-limit case in the background
@cluster_test
def test_materialize_through_slurm(slurm_cluster, tmp_path) -> None:
    prefix = _prefix()
    out = materialize(tmp_path, slurm_config(slurm_cluster, prefix), {"epochs": 2})
    assert out["success"], out
    md = out["metadata"]
    assert md["outcome"] == "completed" and md["steps"] == md["total_steps"] > 0
    assert md["slurm_state"] == "COMPLETED" and md["slurm_adopted"] is False
    job_id = md["slurm_job_id"]
    assert out["tags"][JOB_ID_TAG] == job_id and out["tags"][STATE_TAG] == "COMPLETED"
    work = tmp_path / "work" / CELL.key
    assert (work / "slurm" / "job_id").read_text().strip() == job_id
    assert "#SBATCH --signal=B:USR1@120" in (work / "slurm" / "job.sh").read_text()
    assert f"SLURM job {job_id} on" in (work / "train.log").read_text()
    assert wait_sacct_state(f"{prefix}-{CELL.key}", "COMPLETED") == [(job_id, "COMPLETED")]


@cluster_test
def test_killed_orchestrator_reattaches_to_its_job(slurm_cluster, tmp_path) -> None:
    prefix = _prefix()
    name = f"{prefix}-{CELL.key}"
    data = tmp_path / "data"
    work = data / "work" / CELL.key
    cfg = slurm_config(slurm_cluster, prefix)
    overrides = {"epochs": 15}  # long enough to be still running when re-attached
    proc, _, log = start_child(tmp_path, data, cfg, overrides)
    try:
        wait_for("training to start", lambda: heartbeat_step(work) >= 2, 90, proc)
    finally:
        proc.kill()  # SIGKILL: no cancel, no cleanup, the job keeps running
        proc.wait(10)
    first = (work / "slurm" / "job_id").read_text().strip()
    assert any(r.startswith(first + "|") for r in squeue_by_name(name))
    out = materialize(data, cfg, overrides)
    assert out["success"], out
    md = out["metadata"]
    assert md["slurm_job_id"] == first and md["slurm_adopted"] is True
    assert md["outcome"] == "completed" and md["steps"] == md["total_steps"] > 0
    assert out["tags"][JOB_ID_TAG] == first
    assert wait_sacct_state(name, "COMPLETED") == [(first, "COMPLETED")]  # exactly one job


@cluster_test
def test_usr1_before_the_limit_checkpoints_then_resumes(slurm_cluster, tmp_path) -> None:
    """What ``--signal=B:USR1@120`` does near the limit, sent now with ``scancel --signal``."""
    prefix = _prefix()
    cfg = slurm_config(slurm_cluster, prefix)
    work = tmp_path / "work" / CELL.key
    latest = work / "checkpoints" / "latest.pt"
    sent: list[str] = []
    demo = get_profile("demo")
    per_epoch = len(load_dataset(demo).y_train) // demo.batch_size
    # Step `per_epoch` is a validation point (checkpoint); the run then hangs two steps on.
    fault = f"hang@{per_epoch + 2}"

    def send_usr1() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            latest.exists() and heartbeat_step(work) > per_epoch
        ):
            time.sleep(0.2)
        job_id = (work / "slurm" / "job_id").read_text().strip()
        sent.append(job_id)
        _client("scancel", "--signal=USR1", "--batch", job_id)

    sender = threading.Thread(target=send_usr1, daemon=True)
    sender.start()
    out = materialize(tmp_path, cfg, {"epochs": 3, "fault": fault})
    sender.join(10)
    assert not out["success"] and sent
    failure = out["failure"]
    assert failure["metadata"]["failure_class"] == "timeout", failure
    assert (
        f"SLURM job {sent[0]} ended FAILED (exit 138: stopped by SIGUSR1"
        in (failure["description"])
    )
    # The retry (the sensors tag it as a resume) continues from the checkpoint.
    again = materialize(tmp_path, cfg, {"epochs": 3}, tags={"deconflow/resume": "true"})
    assert again["success"], again
    md = again["metadata"]
    assert md["resumes"] == 1 and md["steps"] == md["total_steps"] == 3 * per_epoch
    assert md["slurm_job_id"] != sent[0]


@cluster_test
def test_poller_costs_one_squeue_per_interval(slurm_cluster, tmp_path) -> None:
    res = SlurmResource(
        **slurm_config(slurm_cluster, _prefix(), gpus_per_job=0, mem="20M", signal_before_s=0)
    )
    ids = []
    for seed in range(20):
        cell = Cell("base", 0.1, 0.001, seed)
        work = tmp_path / cell.key
        work.mkdir()
        (work / "job.sh").write_text(res.render_script(cell, ["sleep", "120"], {}, work))
        ids.append(res.submit(work / "job.sh"))
    env = res.client_env()
    try:
        # One process, 20 jobs in flight.
        poller = SlurmPoller(env, interval_s=1.0)
        for job_id in ids:
            poller.track(job_id)
        time.sleep(4.5)
        assert all(poller.state(j) is not None for j in ids)
        assert 3 <= poller.counts["squeue"] <= 7, poller.counts
        # Two processes' pollers sharing the cache file: still ~one squeue per interval.
        cache = tmp_path / "squeue-cache.json"
        a, b = SlurmPoller(env, 1.0, cache), SlurmPoller(env, 1.0, cache)
        for i, job_id in enumerate(ids):
            (a if i % 2 else b).track(job_id)
        time.sleep(4.5)
        together = a.counts["squeue"] + b.counts["squeue"]
        assert together <= 7 and a.counts["squeue_cached"] + b.counts["squeue_cached"] >= 2, (
            a.counts,
            b.counts,
        )
    finally:
        subprocess.run(["scancel", *ids], env=env, check=False)
    ends = [poller.wait_final(j, 60) for j in ids]
    assert all(st is not None and st.base_state == "CANCELLED" for st in ends), ends
    shown = _parse_scontrol(_client("scontrol", "-o", "show", "job", ids[0]))  # the fallback
    assert shown[ids[0]]["JobState"] == "CANCELLED"
    assert poller.counts["sacct"] <= 8, poller.counts  # not one per job
    for p in (poller, a, b):
        for job_id in ids:
            p.untrack(job_id)


@cluster_test
def test_time_limit_ends_timeout(timeout_run) -> None:
    proc = timeout_run["proc"]
    proc.wait(240)
    out = json.loads(timeout_run["result"].read_text())
    assert not out["success"]
    failure = out["failure"]
    assert failure["metadata"]["failure_class"] == "timeout", failure
    assert "ended TIMEOUT (time limit 00:01:00)" in failure["description"]
    assert out["tags"]["deconflow/failure_class"] == "timeout"
    assert out["tags"][STATE_TAG] == "TIMEOUT"
    assert [s for _, s in sacct_by_name(timeout_run["name"])] == ["TIMEOUT"]


@cluster_test
def test_a_job_whose_id_was_never_recorded_is_found_by_its_name(slurm_cluster, tmp_path) -> None:
    """The orchestrator was killed between sbatch's answer and writing ``job_id`` (seen in
    the queue-restart test under load): the next attempt finds the completed job by its
    exact name in SLURM's accounting since the ``submitting`` mark and reports it, instead
    of submitting the partition a second time."""
    prefix = _prefix()
    res = SlurmResource(**slurm_config(slurm_cluster, prefix))
    work = tmp_path / "work" / CELL.key
    sdir = work / "slurm"
    sdir.mkdir(parents=True)
    (sdir / "submitting").write_text(f"{time.time()}\n")  # what launch writes before sbatch
    script = sdir / "job.sh"
    script.write_text(res.render_script(CELL, ["true"], {}, work))
    job = res.submit(script)  # ... and then the process died: no job_id file
    name = f"{prefix}-{CELL.key}"
    assert wait_sacct_state(name, "COMPLETED") == [(job, "COMPLETED")]
    (work / "summary.json").write_text(json.dumps({"outcome": "completed"}))
    assert res.finished_job(CELL, work) == job
