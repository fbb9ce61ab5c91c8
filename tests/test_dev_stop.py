"""``deconflow dev`` stops within 30 s on SIGTERM or SIGINT with a run in flight, and leaves
the training running (the restart rules: only an explicit terminate stops a training)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from deconflow.partitions import partition_key
from deconflow.sweep import Cell
from tests.helpers import alive, free_port, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CELLS = {signal.SIGTERM: Cell("base", 0.1, 1e-3, 0), signal.SIGINT: Cell("base", 0.1, 1e-3, 1)}
LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on PythonError { message }
  }
}
"""


def descendants(root: int) -> dict[int, str]:
    """Live descendants of ``root`` (pid -> command line), from /proc."""
    parent, cmd = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rfind(")") + 2 :].split()
                if fields[0] == "Z":
                    continue
                parent[int(entry.name)] = int(fields[1])
                cmd[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
    out, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in out:
                out[child] = cmd[child].decode(errors="replace")
                frontier.append(child)
    return out


def trainings_left(data: Path) -> list[int]:
    """Trainings of this module's data folder still running (retries included)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(data) in (entry / "cmdline").read_text():
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def is_training(pid: int) -> bool:
    try:
        return b"deconflow.training.run" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_dev_stops_within_30s_with_a_run_in_flight(sweep_env):
    """End to end with SIGTERM (SIGINT takes the same path: tests/test_dev_server.py)."""
    signum = signal.SIGTERM
    cell = CELLS[signum]
    port = free_port()
    env = {**os.environ, "DECONFLOW_TRAIN_OVERRIDES": '{"epochs": 400}'}
    log = open(sweep_env / f"dev-{signum}.log", "wb")  # noqa: SIM115 - closed below
    dev = subprocess.Popen(
        [sys.executable, "-m", "deconflow.cli", "dev", "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    training = None
    try:
        url = f"http://127.0.0.1:{port}/graphql"

        def launched() -> bool:
            try:
                res = requests.post(
                    url,
                    json={
                        "query": LAUNCH,
                        "variables": {
                            "params": {
                                "assetSelection": [{"path": ["training_run"]}],
                                "partitionNames": [partition_key(cell)],
                            }
                        },
                    },
                    timeout=10,
                ).json()
            except (requests.RequestException, ValueError):
                return False
            kind = res["data"]["launchPartitionBackfill"]["__typename"]
            assert kind == "LaunchBackfillSuccess", res
            return True

        wait_until(launched, 180, "deconflow dev's webserver to answer", proc=dev)
        heartbeat = sweep_env / "work" / cell.key / "heartbeat.json"
        wait_until(heartbeat.exists, 240, "the training to start", proc=dev)

        tree = descendants(dev.pid)
        trainings = [p for p, c in tree.items() if f"--key {cell.key}" in c]
        assert trainings, tree
        training = trainings[0]
        # Trainings run in sessions of their own (they outlive the orchestrator); the rest
        # (dagster dev, webserver, daemon, code server, run workers) must stop.
        training_sessions = {os.getsid(p) for p, c in tree.items() if "training.run" in c}
        watchers = {p: c for p, c in tree.items() if os.getsid(p) not in training_sessions}
        assert any("dagster" in c for c in watchers.values()), watchers

        t0 = time.monotonic()
        dev.send_signal(signum)
        dev.wait(timeout=60)
        took = time.monotonic() - t0
        assert took <= 30, f"deconflow dev took {took:.0f} s to stop"
        # (a process forked as a training but not yet exec'd was a "watcher" in the snapshot)
        left = {p: c for p, c in watchers.items() if alive(p) and not is_training(p)}
        assert not left, f"still running after deconflow dev stopped: {left}"
        assert alive(training), "the training was stopped with the orchestrator"
    finally:
        log.close()
        for pid in [dev.pid, training, *trainings_left(sweep_env)]:
            if pid and alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
