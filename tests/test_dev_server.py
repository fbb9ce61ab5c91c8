"""The supervisor behind ``deconflow dev`` on stand-in processes: on SIGINT or SIGTERM it ends
the whole session of the server it started, even children that ignore every polite signal,
and leaves alone a process in a session of its own (a training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deconflow.dev_server import TERM_S
from tests.helpers import alive, wait_until

GRACE_S = 1.0
# A stand-in for `dagster dev` with a run in flight: it ignores SIGINT and SIGTERM (as a
# server waiting for its run workers does), so do its run worker and that worker's own
# child; the training runs in a session of its own.
SERVER = r"""
import json, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
worker = subprocess.Popen([sys.executable, "-c", stubborn])
training = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            start_new_session=True)
tmp = sys.argv[1] + ".tmp"
open(tmp, "w").write(json.dumps({"worker": worker.pid, "training": training.pid}))
import os; os.rename(tmp, sys.argv[1])
time.sleep(600)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_servers_session_and_spares_the_training(tmp_path, signum):
    pids_file = tmp_path / "pids.json"
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    code = (
        "import sys; from deconflow.dev_server import supervise; "
        f"sys.exit(supervise([sys.executable, {str(script)!r}, {str(pids_file)!r}], "
        f"grace_s={GRACE_S}))"
    )
    sup = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    pids: dict = {}
    try:
        wait_until(pids_file.exists, 60, "the stand-in server to start", proc=sup, every=0.1)
        pids = json.loads(pids_file.read_text())
        t0 = time.monotonic()
        sup.send_signal(signum)
        rc = sup.wait(timeout=60)
        took = time.monotonic() - t0
        assert rc == 128 + signum
        assert took <= GRACE_S + 2 * TERM_S + 5, f"took {took:.1f} s"
        assert not alive(pids["worker"]), "a run worker that ignores SIGTERM outlived the stop"
        assert alive(pids["training"]), "the training (its own session) was stopped"
    finally:
        for pid in (sup.pid, pids.get("worker"), pids.get("training")):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_server_ending_by_itself_ends_the_supervisor(tmp_path):
    from deconflow.dev_server import supervise

    assert supervise([sys.executable, "-c", "raise SystemExit(3)"]) == 3
