"""The watchdog's policies and tick, on synthetic run records (fast: no SLURM, no training)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from deconflow.partitions import partition_key
from deconflow.protocol import (
    ALERT_TAG,
    ATTEMPT_TAG,
    CELL_TAG,
    GRAD_ACCUM_TAG,
    RESUME_TAG,
    RETRY_CLASS_TAG,
    RETRY_OF_TAG,
    STUCK_TAG,
    SWEEP_TAG,
)
from deconflow.sensors import (
    AlertWebhook,
    Cursor,
    RunInfo,
    WatchdogSettings,
    build_watchdog_sensor,
    decide,
    evaluate_tick,
)
from deconflow.sweep import load_grid

GRID = load_grid()
SWEEP = GRID.name
CELLS = [c.key for c in GRID.cells]
S = WatchdogSettings()


def failed(cls: str, run_id: str, cell: str = CELLS[0], **tags) -> RunInfo:
    t = {CELL_TAG: cell, "deconflow/failure_class": cls, **tags}
    return RunInfo(run_id, "failed", t)


# --------------------------------------------------------------------------- pure policies


def test_oom_doubles_grad_accum_three_times_then_alerts() -> None:
    hist = [failed("oom", "r1")]
    d = decide(hist, S, SWEEP)
    assert d.action == "retry" and d.tags[GRAD_ACCUM_TAG] == "2" and RESUME_TAG not in d.tags
    assert d.tags[ATTEMPT_TAG] == "2" and d.tags[RETRY_OF_TAG] == "r1"
    assert d.tags[RETRY_CLASS_TAG] == "oom" and d.tags[SWEEP_TAG] == SWEEP
    hist = [failed("oom", "r2", **{GRAD_ACCUM_TAG: "2"}), *hist]
    assert decide(hist, S, SWEEP).tags[GRAD_ACCUM_TAG] == "4"
    hist = [failed("oom", "r3", **{GRAD_ACCUM_TAG: "4"}), *hist]
    assert decide(hist, S, SWEEP).tags[GRAD_ACCUM_TAG] == "8"
    hist = [failed("oom", "r4", **{GRAD_ACCUM_TAG: "8"}), *hist]
    assert decide(hist, S, SWEEP).action == "alert"


@pytest.mark.parametrize("cls", ["timeout", "node_fail", "preempted", "stuck", "cancelled"])
def test_resume_classes_resume_with_a_shared_limit(cls) -> None:
    hist = [failed(cls, "r1", **{GRAD_ACCUM_TAG: "2"})]
    d = decide(hist, S, SWEEP)
    assert d.action == "retry" and d.tags[RESUME_TAG] == "true"
    assert d.tags[GRAD_ACCUM_TAG] == "2"  # an earlier OOM retry's accumulation is kept
    hist = [failed("timeout", "r3"), failed("node_fail", "r2"), *hist]
    assert decide(hist, S, SWEEP).action == "retry"  # 3 failures: third retry
    hist = [failed(cls, "r4"), *hist]
    assert decide(hist, S, SWEEP).action == "alert"


def test_stuck_mark_wins_over_the_cancelled_class() -> None:
    run = failed("cancelled", "r1", **{STUCK_TAG: "no progress for 20s"})
    d = decide([run], S, SWEEP)
    assert d.failure_class == "stuck" and d.tags[RESUME_TAG] == "true"


def test_diverged_is_not_retried_unless_confirmation_is_configured() -> None:
    assert decide([failed("diverged", "r1")], S, SWEEP).action == "alert"
    confirm = WatchdogSettings(confirm_diverged=True)
    assert decide([failed("diverged", "r1")], confirm, SWEEP).action == "retry"
    two = [failed("diverged", "r2"), failed("diverged", "r1")]
    assert decide(two, confirm, SWEEP).action == "alert"


def test_unknown_gets_one_retry_then_alert() -> None:
    assert decide([failed("unknown", "r1")], S, SWEEP).action == "retry"
    assert decide([failed("unknown", "r2"), failed("unknown", "r1")], S, SWEEP).action == "alert"


def test_counts_restart_after_a_success_and_user_cancel_is_left_alone() -> None:
    ok = RunInfo("r2", "succeeded", {CELL_TAG: CELLS[0]})
    hist = [failed("unknown", "r3"), ok, failed("unknown", "r1")]
    assert decide(hist, S, SWEEP).action == "retry"
    user = RunInfo("r1", "cancelled", {CELL_TAG: CELLS[0]})
    assert decide([user], S, SWEEP).action == "none"


def test_cursor_is_bounded() -> None:
    cur = Cursor(None, cap=50)
    for i in range(500):
        cur.handled[f"c{i}"] = f"r{i}"
        cur.alerted[f"a{i}"] = float(i)
    again = Cursor(cur.dumps(), cap=50)
    assert len(again.handled) == 50 and "c499" in again.handled and "c0" not in again.handled
    assert len(again.alerted) == 50 and len(cur.dumps()) < 5000


# --------------------------------------------------------------------------- ticks on an instance


def add_run(instance, cell: str, status: dg.DagsterRunStatus, **tags) -> str:
    key = partition_key(next(c for c in GRID.cells if c.key == cell))
    t = {SWEEP_TAG: SWEEP, CELL_TAG: cell, "dagster/partition": str(key), **tags}
    return create_run_for_test(instance, job_name="train_cells", status=status, tags=t).run_id


def test_tick_requests_each_failed_partition_once(instance) -> None:
    r1 = add_run(
        instance, CELLS[0], dg.DagsterRunStatus.FAILURE, **{"deconflow/failure_class": "oom"}
    )
    add_run(instance, CELLS[1], dg.DagsterRunStatus.SUCCESS)
    rep = evaluate_tick(instance, SWEEP, None, S)
    assert [r.run_key for r in rep.requests] == [f"{CELLS[0]}:{r1}"]
    req = rep.requests[0]
    assert req.partition_key == str(partition_key(GRID.cells[0]))
    assert req.tags[GRAD_ACCUM_TAG] == "2" and req.tags[CELL_TAG] == CELLS[0]
    # Same state, next tick: nothing new (the cursor remembers the handled failure).
    assert evaluate_tick(instance, SWEEP, rep.cursor, S).requests == []
    # Even with a lost cursor, a partition with a run in progress is never requested.
    add_run(instance, CELLS[0], dg.DagsterRunStatus.NOT_STARTED, **{GRAD_ACCUM_TAG: "2"})
    assert evaluate_tick(instance, SWEEP, None, S).requests == []


def test_no_request_while_an_untagged_backfill_run_is_queued(instance) -> None:
    add_run(
        instance, CELLS[0], dg.DagsterRunStatus.FAILURE, **{"deconflow/failure_class": "timeout"}
    )
    key = str(partition_key(GRID.cells[0]))
    create_run_for_test(  # a backfill run not yet started: no deconflow tags
        instance,
        job_name="train_cells",
        status=dg.DagsterRunStatus.NOT_STARTED,
        tags={"dagster/partition": key},
    )
    assert evaluate_tick(instance, SWEEP, None, S).requests == []


def test_stuck_run_is_marked_and_cancelled_then_resumed(instance, tmp_path) -> None:
    run_id = add_run(instance, CELLS[2], dg.DagsterRunStatus.STARTED, **{"deconflow/pid": "999999"})
    work = tmp_path / "data" / "work" / CELLS[2]
    work.mkdir(parents=True)
    (work / "heartbeat.json").write_text(json.dumps({"step": 5, "time": time.time() - 100}))
    fast = WatchdogSettings(stuck_after_s=10)
    rep = evaluate_tick(instance, SWEEP, None, fast, now=time.time() + 50)  # run started "now"
    assert [c["run_id"] for c in rep.cancelled] == [run_id] and rep.requests == []
    assert STUCK_TAG in instance.get_run_by_id(run_id).tags
    again = evaluate_tick(instance, SWEEP, rep.cursor, fast, now=time.time() + 60)
    assert again.cancelled == []  # not cancelled twice
    # The run worker notices the end of its job and fails the run: the next tick resumes it.
    instance.report_run_failed(instance.get_run_by_id(run_id))
    rep3 = evaluate_tick(instance, SWEEP, again.cursor, fast)
    assert len(rep3.requests) == 1 and rep3.requests[0].tags[RESUME_TAG] == "true"
    assert rep3.requests[0].tags[RETRY_CLASS_TAG] == "stuck"


def test_fresh_heartbeat_is_not_stuck_and_queued_is_only_reported(instance, tmp_path) -> None:
    live = add_run(instance, CELLS[3], dg.DagsterRunStatus.STARTED)
    work = tmp_path / "data" / "work" / CELLS[3]
    work.mkdir(parents=True)
    (work / "heartbeat.json").write_text(json.dumps({"step": 5, "time": time.time()}))
    q = add_run(
        instance, CELLS[4], dg.DagsterRunStatus.STARTED, **{"deconflow/slurm_state": "PENDING"}
    )
    s = WatchdogSettings(stuck_after_s=30, queued_after_s=60)
    rep = evaluate_tick(instance, SWEEP, None, s, now=time.time() + 20)
    assert rep.cancelled == [] and rep.queued == []
    rep = evaluate_tick(instance, SWEEP, None, s, now=time.time() + 120)
    assert [c["run_id"] for c in rep.cancelled] == [live]
    assert [q_["run_id"] for q_ in rep.queued] == [q]
    assert instance.get_run_by_id(q).status == dg.DagsterRunStatus.STARTED  # not cancelled
    assert rep.alerts[0]["kind"] == "queued"


class _Hook(BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers["Content-Length"])
        _Hook.got.append(json.loads(self.rfile.read(n)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook():
    _Hook.got = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alert", _Hook.got
    server.shutdown()


def test_failure_rate_and_exhausted_retries_alert_the_webhook(instance, tmp_path, webhook) -> None:
    url, got = webhook
    work = tmp_path / "data" / "work" / CELLS[0]
    work.mkdir(parents=True)
    (work / "train.log").write_text("step 1\nRuntimeError: injected crash at step 5\n")
    for i in range(10):
        add_run(instance, CELLS[i], dg.DagsterRunStatus.SUCCESS)
    add_run(
        instance, CELLS[0], dg.DagsterRunStatus.FAILURE, **{"deconflow/failure_class": "unknown"}
    )
    last = add_run(
        instance,
        CELLS[0],
        dg.DagsterRunStatus.FAILURE,
        **{"deconflow/failure_class": "unknown", "deconflow/failure_reason": "exit code 1"},
    )
    add_run(
        instance, CELLS[1], dg.DagsterRunStatus.FAILURE, **{"deconflow/failure_class": "diverged"}
    )
    rep = evaluate_tick(instance, SWEEP, None, S, alerts=AlertWebhook(url=url))
    assert rep.requests == []  # unknown twice: retry spent; diverged: a result
    assert rep.failure_rate == pytest.approx(0.2)
    kinds = sorted(a["kind"] for a in got)
    assert kinds == ["failed", "failed", "failure_rate"]
    crash = next(a for a in got if a["cell"] == CELLS[0])
    assert crash["run_id"] == last and crash["class"] == "unknown" and crash["attempts"] == 3
    assert crash["partition"] == str(partition_key(GRID.cells[0]))
    assert crash["last_log_lines"][-1].startswith("RuntimeError: injected crash")
    assert "unknown" in instance.get_run_by_id(last).tags[ALERT_TAG]
    # Alerts are sent once: the next tick posts nothing.
    evaluate_tick(instance, SWEEP, rep.cursor, S, alerts=AlertWebhook(url=url))
    assert len(got) == 3


def test_sensor_definition_evaluates_with_resources(instance) -> None:
    from deconflow.resources import LocalProcessResource

    add_run(
        instance, CELLS[5], dg.DagsterRunStatus.FAILURE, **{"deconflow/failure_class": "timeout"}
    )
    sensor = build_watchdog_sensor(GRID, WatchdogSettings())
    ctx = dg.build_sensor_context(
        instance=instance,
        resources={"compute": LocalProcessResource(), "alerts": AlertWebhook()},
    )
    result = sensor(ctx)
    assert len(result.run_requests) == 1 and result.cursor
    assert result.run_requests[0].tags[RESUME_TAG] == "true"
    assert sensor.minimum_interval_seconds == 30
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


# --------------------------------------------------------------------------- issue 12: causes


@pytest.mark.parametrize("cls", ["submit_rejected", "config_error", "disk_full"])
def test_causes_a_retry_cannot_fix_alert_and_are_not_retried(cls) -> None:
    d = decide([failed(cls, "r1", **{"deconflow/failure_reason": "why"})], S, SWEEP)
    assert d.action == "alert" and "not retried" in d.reason and "why" in d.reason


def test_killed_by_signal_resumes_once_then_alerts() -> None:
    d = decide([failed("killed_by_signal", "r1")], S, SWEEP)
    assert d.action == "retry" and d.tags[RESUME_TAG] == "true"
    two = [failed("killed_by_signal", "r2"), failed("killed_by_signal", "r1")]
    assert decide(two, S, SWEEP).action == "alert"


def _beat(tmp_path, cell: str, step: int, t: float, total: int = 500, epoch=None) -> None:
    work = tmp_path / "data" / "work" / cell
    work.mkdir(parents=True, exist_ok=True)
    ep = step / 10 if epoch is None else epoch  # 10 steps per epoch: a 50-epoch run
    beat = {"step": step, "epoch": ep, "time": t, "total_steps": total}
    (work / "heartbeat.json").write_text(json.dumps(beat))


def test_a_heartbeat_without_new_steps_is_stuck(instance, tmp_path) -> None:
    """The process writes its heartbeat (fresh) but the step does not move: caught by the
    no-progress rule, not by the heartbeat's age; a SLURM job not RUNNING is not timed."""
    s = WatchdogSettings(stuck_after_s=600, no_progress_after_s=100, slow_after_s=10**9)
    t0 = time.time()
    live = add_run(instance, CELLS[0], dg.DagsterRunStatus.STARTED, **{"deconflow/pid": "1"})
    waiting = add_run(
        instance, CELLS[1], dg.DagsterRunStatus.STARTED, **{"deconflow/slurm_state": "CONFIGURING"}
    )
    _beat(tmp_path, CELLS[0], 40, t0)
    _beat(tmp_path, CELLS[1], 40, t0)
    rep = evaluate_tick(instance, SWEEP, None, s, now=t0)
    assert rep.cancelled == []
    _beat(tmp_path, CELLS[0], 40, t0 + 150)  # a fresh heartbeat, the same step
    _beat(tmp_path, CELLS[1], 40, t0 + 150)
    rep = evaluate_tick(instance, SWEEP, rep.cursor, s, now=t0 + 150)
    assert [c["run_id"] for c in rep.cancelled] == [live]
    reason = instance.get_run_by_id(live).tags[STUCK_TAG]
    assert reason.startswith("no new training step for 150s (still at step 40)"), reason
    assert STUCK_TAG not in instance.get_run_by_id(waiting).tags


def test_steps_that_move_reset_the_no_progress_clock(instance, tmp_path) -> None:
    s = WatchdogSettings(stuck_after_s=600, no_progress_after_s=100, slow_after_s=10**9)
    t0 = time.time()
    add_run(instance, CELLS[0], dg.DagsterRunStatus.STARTED, **{"deconflow/slurm_state": "RUNNING"})
    cursor = None
    for k in range(4):  # 80 s apart, one step further each time: never 100 s without one
        _beat(tmp_path, CELLS[0], 40 + k, t0 + 80 * k)
        rep = evaluate_tick(instance, SWEEP, cursor, s, now=t0 + 80 * k)
        assert rep.cancelled == []
        cursor = rep.cursor
    assert len(json.loads(cursor)["progress"]) == 1  # only runs in flight are remembered


def test_the_plans_rule_running_an_hour_still_before_epoch_5(instance, tmp_path) -> None:
    """Defaults: past 3600 s a run must be past epoch 5 of 50 (10 % of its steps), scaled to
    its own length: a 16-epoch run must be past epoch 1.6."""
    t0 = time.time()
    slow = add_run(instance, CELLS[0], dg.DagsterRunStatus.STARTED)
    fine = add_run(instance, CELLS[1], dg.DagsterRunStatus.STARTED)
    short_slow = add_run(instance, CELLS[2], dg.DagsterRunStatus.STARTED)
    cursor = None
    for dt in (0, 1800, 3700):  # steps keep coming, but slowly for two of them
        _beat(tmp_path, CELLS[0], 20 + dt // 200, t0 + dt)  # epoch 2.0 -> 3.8 of 50
        _beat(tmp_path, CELLS[1], 40 + dt // 20, t0 + dt)  # epoch 4.0 -> 22.5 of 50
        step = 10 + dt // 1000  # 11 steps per epoch, 16 epochs: epoch 0.9 -> 1.2
        _beat(tmp_path, CELLS[2], step, t0 + dt, total=176, epoch=step / 11)
        rep = evaluate_tick(instance, SWEEP, cursor, S, now=t0 + dt)
        cursor = rep.cursor
    stuck = {c["run_id"] for c in rep.cancelled}
    assert stuck == {slow, short_slow}, rep.lines
    reason = instance.get_run_by_id(slow).tags[STUCK_TAG]
    assert reason.startswith("running 3700s and still at epoch 3.80 of 50, rule: epoch 5.00 ")
    reason = instance.get_run_by_id(short_slow).tags[STUCK_TAG]
    assert "of 16, rule: epoch 1.60" in reason, reason
    assert STUCK_TAG not in instance.get_run_by_id(fine).tags


def test_a_run_that_failed_before_its_body_is_tied_to_its_cell(instance, tmp_path) -> None:
    """A resource that fails to start (a bad SLURM partition name) fails the run before the
    asset tags its cell: the watchdog finds it by its partition, reads the cause from its
    events, tags it, and alerts (a config error is not retried)."""
    from deconflow.assets.training import build_training_run
    from deconflow.resources import SweepSettings
    from deconflow.resources.slurm import SlurmResource

    res = dg.materialize(
        [build_training_run(GRID)],
        partition_key=str(partition_key(GRID.cells[0])),
        resources={
            "compute": SlurmResource(partition="gpu;rm -rf ~"),
            "sweep": SweepSettings(profile="demo"),
        },
        instance=instance,
        raise_on_error=False,
    )
    assert not res.success
    run = instance.get_run_by_id(res.run_id)
    assert CELL_TAG not in run.tags and "deconflow/failure_class" not in run.tags
    rep = evaluate_tick(instance, SWEEP, None, S)
    assert rep.requests == []
    assert [(a["kind"], a["cell"], a["class"]) for a in rep.alerts] == [
        ("failed", CELLS[0], "config_error")
    ]
    tags = instance.get_run_by_id(res.run_id).tags
    assert tags["deconflow/failure_class"] == "config_error"
    assert "SlurmConfigError: invalid SlurmResource.partition" in tags["deconflow/failure_reason"]
    assert "not retried" in tags[ALERT_TAG]
    assert tags[CELL_TAG] == CELLS[0] and tags[SWEEP_TAG] == SWEEP  # visible to every reader


def test_failed_analysis_runs_alert_once(instance, webhook) -> None:
    from deconflow.protocol import ANALYSIS_KIND, KIND_TAG

    url, got = webhook

    @dg.asset(name="run_fits")
    def broken() -> None:
        raise RuntimeError("duckdb: disk I/O error on data/deconflow.duckdb")

    res = dg.materialize(
        [broken], instance=instance, tags={KIND_TAG: ANALYSIS_KIND}, raise_on_error=False
    )
    assert not res.success
    job_run = create_run_for_test(
        instance, job_name="analyse_sweep", status=dg.DagsterRunStatus.FAILURE
    ).run_id
    ok_run = create_run_for_test(instance, job_name="other", status=dg.DagsterRunStatus.FAILURE)
    rep = evaluate_tick(instance, SWEEP, None, S, alerts=AlertWebhook(url=url))
    kinds = {(a["kind"], a["run_id"]) for a in rep.alerts}
    assert kinds == {("analysis_failed", res.run_id), ("analysis_failed", job_run)}
    mine = next(a for a in got if a["run_id"] == res.run_id)
    assert "RuntimeError: duckdb: disk I/O error" in mine["reason"]
    assert ok_run.run_id not in {a["run_id"] for a in got}
    again = evaluate_tick(instance, SWEEP, rep.cursor, S, alerts=AlertWebhook(url=url))
    assert again.alerts == [] and len(got) == 2
