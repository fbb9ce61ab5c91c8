"""Faults on the real commands: a SIGKILLed `deconflow train`, a Ctrl-C'd `deconflow materialize`.

Real subprocesses, real training processes, a real persistent Dagster instance; signals are
sent as a terminal would (SIGINT to the command's process group).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from deconflow.partitions import partition_key
from deconflow.sensors import WatchdogSettings, evaluate_tick
from deconflow.sweep import load_grid, parse_key

pytestmark = pytest.mark.slow  # trains and interrupts deconflow commands

REPO = Path(__file__).resolve().parents[1]
KEY = "base__lr0.1_wd0.001_s0"


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DECONFLOW_DATA": str(data),
        "DAGSTER_HOME": str(data / "dagster_home"),
        "DECONFLOW_COMPUTE": "local",
        "DECONFLOW_PROFILE": "demo",
        "DECONFLOW_TORCH_THREADS": "1",
        "PYTHONPATH": str(REPO),
        **extra,
    }
    env.pop("DECONFLOW_FAULT", None)
    env.update(extra)
    return env


def _cli(args: list[str], env: dict, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deconflow.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a command in a terminal
        **kw,
    )


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _step(work: Path) -> int:
    try:
        return int(json.loads((work / "heartbeat.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"command ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _processes_with(marker: str) -> list[tuple[int, str]]:
    """Live processes whose environment holds ``marker`` (this test's own data folder)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker.encode() not in (d / "environ").read_bytes():
                continue
            stat = (d / "stat").read_text()
            if stat[stat.rfind(")") + 2] == "Z":
                continue
            found.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


@pytest.fixture
def reaper(tmp_path):
    """Kills whatever a failing test left running with its data folder in the environment."""
    yield
    for pid, _ in _processes_with(f"DECONFLOW_DATA={tmp_path / 'data'}"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_killed_train_leaves_the_published_cell_as_it_was(tmp_path, reaper) -> None:
    """`deconflow train --key K` (no --out) trains in $DECONFLOW_DATA/work/K and publishes to
    $DECONFLOW_DATA/runs/K only when it ends: SIGKILL mid-run leaves the published cell
    byte-identical; the next command resumes and replaces it whole."""
    data, cwd = tmp_path / "data", tmp_path / "elsewhere"
    cwd.mkdir()
    published = data / "runs" / KEY
    first = _cli(["train", "--key", KEY, "--epochs", "2"], _env(data), cwd)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (published / "summary.json").exists(), "not published under DECONFLOW_DATA"
    assert not (cwd / "data").exists()  # DECONFLOW_DATA honoured, nothing in the cwd
    assert not (data / "work" / KEY).exists()  # published: the next train starts fresh
    before = _digest(published)

    killed = _cli(
        ["train", "--key", KEY, "--epochs", "2"], _env(data, DECONFLOW_FAULT="hang@15"), cwd
    )
    work = data / "work" / KEY
    ckpt = work / "checkpoints" / "latest.pt"  # saved once per epoch (11 steps), then hangs
    _wait_for(lambda: ckpt.exists() and _step(work) >= 11, 240, "the epoch-1 checkpoint", killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(30)
    assert _digest(published) == before  # untouched, not half-replaced
    assert (work / "checkpoints" / "latest.pt").exists()

    again = _cli(["train", "--key", KEY, "--epochs", "2"], _env(data), cwd)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    summary = json.loads((published / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["steps"] == 22
    assert summary["attempts"] == 2  # resumed from the work folder's checkpoint
    assert not list((data / "runs").glob(".tmp-*")) and not list((data / "runs").glob(".old-*"))


def test_ctrl_c_cancels_the_whole_materialize_command(tmp_path, reaper) -> None:
    """SIGINT to `deconflow materialize` (its process group, as a terminal sends it) while two
    runs train: no third run starts, both end CANCELED, their training is stopped, no pool
    worker or training process is left, and the watchdog retries nothing."""
    data = tmp_path / "data"
    grid = load_grid()
    keys = [c.key for c in grid.cells[:3]]
    env = _env(
        data,
        DECONFLOW_FAULT="hang@8",  # every training hangs at step 8: both stay in flight
        DECONFLOW_TRAIN_OVERRIDES=json.dumps({"epochs": 2, "heartbeat_every_s": 0}),  # every step
    )
    proc = _cli(["materialize", "--key", *keys, "--workers", "2", "--no-analysis"], env, tmp_path)
    works = [data / "work" / k for k in keys[:2]]
    _wait_for(lambda: all(_step(w) >= 7 for w in works), 300, "two trainings at step 7", proc)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("materialize did not end within 120 s of Ctrl-C")
    assert proc.returncode == 130, (out, err)
    assert "cancelled 2 run(s)" in err, err
    # The cancellation it announced is not reported back as errors with stack traces.
    assert "Traceback" not in err and "Stack Trace" not in err, err

    left = _processes_with(f"DECONFLOW_DATA={data}")
    assert left == [], f"orphans: {left}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DECONFLOW_DATA", str(data))
        mp.setenv("DAGSTER_HOME", str(data / "dagster_home"))
        with dg.DagsterInstance.get() as instance:
            runs = instance.get_runs()
            by_partition = {r.tags.get("dagster/partition"): r for r in runs}
            assert len(runs) == 2, [(r.tags.get("dagster/partition"), r.status) for r in runs]
            for k in keys[:2]:
                run = by_partition[str(partition_key(parse_key(k)))]
                assert run.status == dg.DagsterRunStatus.CANCELED, (k, run.status)
            assert str(partition_key(parse_key(keys[2]))) not in by_partition  # never started
            rep = evaluate_tick(instance, grid.name, None, WatchdogSettings())
            assert rep.requests == [] and rep.alerts == []
    beats = [_step(w) for w in works]
    time.sleep(1.5)
    assert [_step(w) for w in works] == beats  # nothing trains any more
