"""``deconflow dev``: ``dagster dev`` under a supervisor that stops it on time.

``dagster dev`` on its own waits for in-flight run workers when interrupted (a 216-cell
run's Ctrl-C had not finished after 120 s). The supervisor forwards the first SIGINT or
SIGTERM to ``dagster dev`` (its own graceful shutdown), and after ``GRACE_S`` ends whatever
of its session is still alive: run workers included. That is what the restart rules want:
a run worker is only a watcher; the trainings (local processes in their own sessions, SLURM
jobs) outlive it, the next start marks its run as ended (``orphans``) and the next attempt
of the partition re-attaches. A second signal skips the grace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

GRACE_S = 15.0  # dagster dev's own shutdown (webserver, daemon, code server)
TERM_S = 5.0  # then SIGTERM to the rest of its session, then SIGKILL
POLL_S = 0.2


def session_members(sid: int) -> list[int]:
    """Pids of live processes in session ``sid`` (from /proc; zombies excluded)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            out.append(int(entry.name))
    return out


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(proc: subprocess.Popen, sid: int, timeout: float, stop_early) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        if not session_members(sid):
            return True
        if stop_early():
            return False
        time.sleep(POLL_S)
    return not session_members(sid)


def supervise(cmd: Sequence[str], grace_s: float = GRACE_S) -> int:
    """Run ``cmd`` in a session of its own; on SIGINT/SIGTERM stop it and all it started
    (within ``grace_s`` + ``TERM_S`` + a little) and return its exit status."""
    signals: list[int] = []

    def on_signal(signum, _frame) -> None:
        signals.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(list(cmd), start_new_session=True)
        sid = proc.pid
        while proc.poll() is None and not signals:
            time.sleep(POLL_S)
        if not signals:
            return proc.returncode
        first = len(signals)
        print(f"deconflow dev: stopping (up to {grace_s + TERM_S:.0f} s)", flush=True)
        _signal_all([proc.pid], signal.SIGINT)
        if not _wait_gone(proc, sid, grace_s, lambda: len(signals) > first):
            left = session_members(sid)
            print(f"deconflow dev: ending {len(left)} process(es) still running", flush=True)
            _signal_all(left, signal.SIGTERM)
            if not _wait_gone(proc, sid, TERM_S, lambda: False):
                _signal_all(session_members(sid), signal.SIGKILL)
                _wait_gone(proc, sid, TERM_S, lambda: False)
        proc.wait()
        return 128 + signals[0]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
