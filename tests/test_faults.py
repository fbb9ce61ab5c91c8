"""Fault injection on the real local SLURM cluster, recovered by the watchdog's tick.

The loop of every test: materialize a partition through SlurmResource (main thread) while a
second thread injects a fault into its job (scancel, SIGSTOP, SIGKILL, slurmd restart) or the
training config injects one (OOM, NaN, a hang past a short time limit); then evaluate the
watchdog tick and execute each RunRequest with ``dg.materialize`` and the request's tags, until
the partition ends completed (or diverged). Each test prints fault->detection and
fault->recovery times (ticks are evaluated back to back here; under ``dagster dev`` add up to
one 30 s sensor interval to detection).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from deconflow.assets.training import build_training_run
from deconflow.partitions import partition_key
from deconflow.protocol import (
    ATTEMPT_TAG,
    CELL_TAG,
    CHECKPOINT_DIR,
    LATEST_CHECKPOINT,
    RETRY_CLASS_TAG,
)
from deconflow.resources.slurm import SlurmResource
from deconflow.resources.sweep_settings import SweepSettings
from deconflow.sensors import WatchdogSettings, evaluate_tick
from deconflow.sweep import load_grid
from deconflow_dev import slurm_cluster as cluster
from tests.helpers import wait_until
from tests.slurm_helpers import (
    CELL,
    _prefix,
    cluster_test,
    heartbeat_step,
    slurm_config,
)

pytestmark = pytest.mark.slow  # SLURM faults on the dev cluster

GRID = load_grid()
FAST = {"epochs": 2, "heartbeat_every_s": 0.5}
SETTINGS = WatchdogSettings(stuck_after_s=8)
TIMES: dict[str, dict[str, float]] = {}


class Harness:
    """One partition, one persistent instance, one SLURM config; runs the fault/recover loop."""

    def __init__(
        self,
        tmp: Path,
        info: cluster.ClusterInfo,
        overrides: dict,
        mp: pytest.MonkeyPatch,
        **slurm,
    ) -> None:
        self.data = tmp / "data"
        mp.setenv("DECONFLOW_DATA", str(self.data))
        (tmp / "home").mkdir()
        self._ctx = dg.instance_for_test(temp_dir=str(tmp / "home"))
        self.instance = self._ctx.__enter__()
        self.compute = SlurmResource(**slurm_config(info, _prefix(), **slurm))
        self.sweep = SweepSettings(profile="demo", overrides_json=json.dumps(overrides))
        self.asset = build_training_run(GRID)
        self.work = self.data / "work" / CELL.key
        self.cursor: str | None = None
        self.t_fault: float | None = None
        self.t_detect: float | None = None

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)

    def materialize(self, tags: dict | None = None, env: dict | None = None) -> bool:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            res = dg.materialize(
                [self.asset],
                partition_key=partition_key(CELL),
                resources={"compute": self.compute, "sweep": self.sweep},
                instance=self.instance,
                tags=tags,
                raise_on_error=False,
            )
        return res.success

    def tick(self):
        rep = evaluate_tick(self.instance, GRID.name, self.cursor, SETTINGS, self.compute)
        self.cursor = rep.cursor
        if (rep.requests or rep.cancelled or rep.alerts) and self.t_detect is None:
            self.t_detect = time.monotonic()
        return rep

    def recover(self, max_rounds: int = 4) -> list:
        """Tick and execute requests until a tick requests nothing; returns the requests run."""
        done = []
        for _ in range(max_rounds):
            rep = self.tick()
            if not rep.requests:
                return done
            for req in rep.requests:
                assert req.partition_key == str(partition_key(CELL))
                self.materialize(tags=dict(req.tags))
                done.append(req)
        return done

    def inject_when(self, at_step: int, fault, checkpointed: bool = False) -> threading.Thread:
        """Run ``fault()`` in a thread once training has passed ``at_step`` (and, with
        ``checkpointed``, saved its first resumable checkpoint: the heartbeat of a validation
        step is written before that step's checkpoint)."""
        latest = self.work / CHECKPOINT_DIR / LATEST_CHECKPOINT

        def go() -> None:
            wait_until(
                lambda: (
                    heartbeat_step(self.work) >= at_step and (not checkpointed or latest.exists())
                ),
                300,
                f"step {at_step}" + (" and a checkpoint" if checkpointed else ""),
                every=0.1,
            )
            self.t_fault = time.monotonic()
            fault()

        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t

    def training_pid(self) -> int:
        return int(json.loads((self.work / "heartbeat.json").read_text())["pid"])

    def job_id(self) -> str:
        return (self.work / "slurm" / "job_id").read_text().strip()

    def runs(self) -> list[dg.DagsterRun]:
        return self.instance.get_runs(dg.RunsFilter(tags={CELL_TAG: CELL.key}))  # newest first

    def check_result(self, name: str, outcome: str, runs: int) -> dict:
        """Published, metrics complete and unique, attempts right; records the times."""
        t_end = time.monotonic()
        summary = json.loads((self.data / "runs" / CELL.key / "summary.json").read_text())
        assert summary["outcome"] == outcome, summary
        batches = pd.read_parquet(self.data / "runs" / CELL.key / "batch_metrics.parquet")
        assert batches["step"].is_unique
        if outcome == "completed":
            assert len(batches) == summary["steps"] == summary["total_steps"]
        all_runs = self.runs()
        assert len(all_runs) == runs, [(r.run_id, r.status) for r in all_runs]
        assert all_runs[0].status == dg.DagsterRunStatus.SUCCESS
        if runs > 1:
            assert all_runs[0].tags[ATTEMPT_TAG] == str(runs)
        t0 = self.t_fault or t_end
        TIMES[name] = {
            "detect_s": round((self.t_detect or t_end) - t0, 1),
            "recover_s": round(t_end - t0, 1),
        }
        print(f"\n[fault] {name}: {TIMES[name]}")
        return summary


@pytest.fixture
def harness(request, slurm_cluster, tmp_path, monkeypatch):
    made: list[Harness] = []

    def make(overrides: dict | None = None, **slurm) -> Harness:
        h = Harness(tmp_path, slurm_cluster, {**FAST, **(overrides or {})}, monkeypatch, **slurm)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@cluster_test
def test_scancel_mid_run_resumes(harness) -> None:
    h = harness()
    scancel = lambda: subprocess.run(["scancel", h.job_id()], check=True)  # noqa: E731
    t = h.inject_when(12, scancel, checkpointed=True)
    assert not h.materialize()
    t.join(10)
    assert h.runs()[0].tags["deconflow/failure_class"] == "cancelled"
    reqs = h.recover()
    assert [r.tags[RETRY_CLASS_TAG] for r in reqs] == ["cancelled"]
    assert reqs[0].tags["deconflow/resume"] == "true"
    summary = h.check_result("scancel", "completed", runs=2)
    assert summary["attempts"] == 2  # resumed from the checkpoint, not restarted


@cluster_test
def test_sigstop_is_detected_as_stuck_cancelled_and_resumed(harness) -> None:
    h = harness()
    cancelled: list = []

    def freeze_then_watch() -> None:
        os.kill(h.training_pid(), signal.SIGSTOP)

        def watch() -> bool:
            cancelled.extend(h.tick().cancelled)
            return bool(cancelled)

        wait_until(watch, 60, "the watchdog to cancel the frozen job", every=1)

    t = h.inject_when(5, freeze_then_watch)
    assert not h.materialize()
    t.join(70)
    assert cancelled and cancelled[0]["action"].startswith("scancel")
    reqs = h.recover()
    assert [r.tags[RETRY_CLASS_TAG] for r in reqs] == ["stuck"]
    h.check_result("sigstop (stuck)", "completed", runs=2)


@cluster_test
def test_sigkill_of_the_training_process_is_retried(harness) -> None:
    h = harness()
    t = h.inject_when(5, lambda: os.kill(h.training_pid(), signal.SIGKILL))
    assert not h.materialize()
    t.join(10)
    reqs = h.recover()
    assert len(reqs) == 1 and reqs[0].tags["deconflow/resume"] == "true"
    h.check_result(f"sigkill ({reqs[0].tags[RETRY_CLASS_TAG]})", "completed", runs=2)


@cluster_test
def test_injected_oom_retries_with_doubled_accumulation(harness) -> None:
    h = harness({"fault": "oom@5"})
    h.t_fault = time.monotonic()
    assert not h.materialize()
    reqs = h.recover()
    assert [r.tags["deconflow/grad_accum"] for r in reqs] == ["2"]
    h.check_result("oom", "completed", runs=2)


@cluster_test
def test_injected_nan_is_a_result_not_retried(harness) -> None:
    h = harness({"fault": "nan@5"})
    h.t_fault = time.monotonic()
    assert h.materialize()
    assert h.recover() == []
    h.check_result("nan (diverged)", "diverged", runs=1)


@cluster_test
@pytest.mark.slurm_exclusive
def test_slurmd_restart_with_a_job_on_it(harness, slurm_cluster) -> None:
    """slurmd stopped and restarted under a running job: the job survives (slurmstepd keeps
    it), the same run finishes, and no second job or run is needed."""
    h = harness()
    lay = cluster._layout(slurm_cluster.state_dir)

    def restart() -> None:
        pid = cluster._daemon_pid(lay, "slurmd")
        assert pid, "slurmd is not running"
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while cluster._daemon_pid(lay, "slurmd") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        cluster._start_slurmd(lay)

    t = h.inject_when(5, restart)
    ok = h.materialize()
    t.join(30)
    cluster.up(slurm_cluster.state_dir)  # waits until the node is back and idle
    assert ok, "the run failed although its job should have survived the slurmd restart"
    assert h.tick().requests == []
    h.check_result("slurmd restart", "completed", runs=1)


@cluster_test
def test_too_short_time_limit_resumes(harness) -> None:
    """A one-minute limit the first attempt overruns (it hangs); the resume finishes in time."""
    h = harness(time_limit="00:01:00", signal_before_s=0)
    h.t_fault = time.monotonic()
    assert not h.materialize(env={"DECONFLOW_FAULT": "hang@13"})  # first attempt only
    assert h.runs()[0].tags["deconflow/failure_class"] == "timeout"
    reqs = h.recover()
    assert [r.tags[RETRY_CLASS_TAG] for r in reqs] == ["timeout"]
    h.check_result("time limit", "completed", runs=2)


def test_daemon_restarted_in_the_middle_of_a_backfill(tmp_path) -> None:
    """A real ``dagster-daemon`` is SIGKILLed mid-backfill and restarted: every partition ends
    materialized with exactly one successful run (local processes, 3 partitions)."""
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.storage.tags import BACKFILL_ID_TAG

    from deconflow.definitions import build_definitions
    from deconflow.instance import ensure_dagster_home

    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "DECONFLOW_DATA": str(tmp_path / "data"),
        "DECONFLOW_COMPUTE": "local",
        "DECONFLOW_TRAIN_OVERRIDES": json.dumps({"epochs": 2}),
        "DECONFLOW_WATCHDOG_STUCK_AFTER_S": "600",
    }
    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "DECONFLOW_DATA")}
    os.environ.update({k: env[k] for k in saved})
    daemons: list[subprocess.Popen] = []

    def start_daemon() -> subprocess.Popen:
        log = open(tmp_path / f"daemon-{len(daemons)}.log", "wb")
        proc = subprocess.Popen(
            ["dagster-daemon", "run", "-w", str(repo / "workspace.yaml")],
            cwd=repo,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        daemons.append(proc)
        return proc

    try:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
        cells = GRID.cells[:3]
        keys = [str(partition_key(c)) for c in cells]
        graph = build_definitions().get_repository_def().asset_graph
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id="restartbf",
            asset_graph=graph,
            partition_names=keys,
            asset_selection=[dg.AssetKey("training_run")],
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config=None,
        )
        instance.add_backfill(backfill)
        first = start_daemon()
        bf_runs = dg.RunsFilter(tags={BACKFILL_ID_TAG: "restartbf"})
        wait_until(lambda: instance.get_runs(bf_runs), 120, "the backfill's first runs", first)
        t_kill = time.monotonic()
        os.killpg(first.pid, signal.SIGKILL)
        at_kill = instance.get_runs(bf_runs)
        # Mid-way: when the daemon died, the backfill still had work in flight.
        assert instance.get_backfill("restartbf").status == BulkActionStatus.REQUESTED
        assert any(r.status != dg.DagsterRunStatus.SUCCESS for r in at_kill) or len(at_kill) < 3
        first.wait(10)
        time.sleep(2)
        start_daemon()
        wait_until(
            lambda: instance.get_backfill("restartbf").status != BulkActionStatus.REQUESTED,
            300,
            "the backfill to end",
            every=1,
        )
        status = instance.get_backfill("restartbf").status
        done = time.monotonic()
        log = (tmp_path / f"daemon-{len(daemons) - 1}.log").read_text()[-3000:]
        assert status == BulkActionStatus.COMPLETED_SUCCESS, (status, log)
        runs = instance.get_runs(bf_runs)
        by_key: dict[str, list] = {}
        for r in runs:
            by_key.setdefault(r.tags.get("dagster/partition"), []).append(r)
        assert sorted(by_key) == sorted(keys), by_key.keys()
        for key, rs in by_key.items():
            ok = [r for r in rs if r.status == dg.DagsterRunStatus.SUCCESS]
            assert len(ok) == 1 == len(rs), (key, [(r.run_id, r.status) for r in rs])
        mats = instance.get_materialized_partitions(dg.AssetKey("training_run"))
        assert set(keys) <= {str(k) for k in mats}
        TIMES["daemon restart mid-backfill"] = {
            "detect_s": 0.0,
            "recover_s": round(done - t_kill, 1),
        }
    finally:
        for p in daemons:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# --------------------------------------------------------------------------- issue 12: causes


@cluster_test
def test_sbatch_rejection_is_submit_rejected_with_slurms_message(harness) -> None:
    """sbatch refuses the job (no such partition): the run fails as submit_rejected with
    SLURM's own message as its reason, and the watchdog alerts instead of resubmitting."""
    h = harness(partition="nosuchpartition")
    assert not h.materialize()
    assert not (h.work / "slurm" / "job_id").exists()  # nothing was submitted
    rep = h.tick()
    assert rep.requests == []
    assert [(a["kind"], a["class"]) for a in rep.alerts] == [("failed", "submit_rejected")]
    tags = h.runs()[0].tags
    assert tags["deconflow/failure_class"] == "submit_rejected"
    assert "Invalid partition name specified" in tags["deconflow/failure_reason"], tags
    assert "not retried" in tags["deconflow/alert"]
    assert h.tick().requests == []  # and never later either


@cluster_test
def test_sigkill_is_killed_by_signal_and_the_reason_names_it(harness) -> None:
    h = harness()
    t = h.inject_when(5, lambda: os.kill(h.training_pid(), signal.SIGKILL))
    assert not h.materialize()
    t.join(10)
    tags = h.runs()[0].tags
    assert tags["deconflow/failure_class"] == "killed_by_signal", tags
    assert "SIGKILL (9)" in tags["deconflow/failure_reason"], tags
    reqs = h.recover()
    assert [r.tags[RETRY_CLASS_TAG] for r in reqs] == ["killed_by_signal"]
    assert reqs[0].tags["deconflow/resume"] == "true"
    h.check_result("sigkill (killed_by_signal)", "completed", runs=2)


@cluster_test
def test_a_job_that_heartbeats_without_progress_is_cancelled_and_resumed(harness) -> None:
    """SLURM says RUNNING and heartbeat.json stays fresh (rewritten, as a heartbeat thread
    would), but the training step does not move: the no-progress rule cancels the job (the
    heartbeat-age rule would not), and the retry resumes from the checkpoint."""
    h = harness()
    s = WatchdogSettings(stuck_after_s=600, no_progress_after_s=6)
    cancelled: list = []

    def keep_beating_without_steps() -> None:
        cursor = None
        deadline = time.monotonic() + 90
        while not cancelled and time.monotonic() < deadline:
            beat = json.loads((h.work / "heartbeat.json").read_text())
            beat["time"] = time.time()
            (h.work / "heartbeat.json").write_text(json.dumps(beat))
            rep = evaluate_tick(h.instance, GRID.name, cursor, s, h.compute)
            cursor = rep.cursor
            cancelled.extend(rep.cancelled)
            time.sleep(1)
        if cancelled and h.t_detect is None:
            h.t_detect = time.monotonic()

    # From the first heartbeat on: the run hangs at step 8, and the trainer's heartbeat is
    # throttled, so on a fast machine no heartbeat ever names a step between 0 and 8.
    t = h.inject_when(1, keep_beating_without_steps)
    assert not h.materialize(env={"DECONFLOW_FAULT": "hang@8"})  # first attempt only
    t.join(100)
    assert cancelled and cancelled[0]["action"].startswith("scancel"), cancelled
    stuck = h.runs()[0].tags["deconflow/stuck"]
    assert stuck.startswith("no new training step for"), stuck
    reqs = h.recover()
    assert [r.tags[RETRY_CLASS_TAG] for r in reqs] == ["stuck"]
    h.check_result("heartbeat without progress (stuck)", "completed", runs=2)
