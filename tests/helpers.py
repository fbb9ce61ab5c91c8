"""Shared test helpers (a plain module; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import dagster as dg

# Small demo runs: 4 epochs of 11 steps, every monitor still fires.
SMALL = {"epochs": 4}


def make_defs(**overrides):
    from deconflow.definitions import build_definitions
    from deconflow.resources import LocalProcessResource, SweepSettings

    return build_definitions(
        resources={
            "compute": LocalProcessResource(),
            "sweep": SweepSettings(
                profile="demo", overrides_json=json.dumps({**SMALL, **overrides})
            ),
        }
    )


def asset(defs: dg.Definitions, name: str) -> dg.AssetsDefinition:
    return defs.get_repository_def().assets_defs_by_key[dg.AssetKey(name)]


def downstream(defs: dg.Definitions, through: str | None = None) -> list:
    """Every asset and check below ``training_run``; with ``through``, only that asset and
    what it reads (``through="sweep_db"``: the DuckDB writer without the figures, the
    report and the export, for tests about the writer alone)."""
    repo = defs.get_repository_def()
    keep = None
    if through is not None:
        keep = dg.AssetSelection.assets(through).upstream().resolve(repo.asset_graph)
    assets = [
        a
        for k, a in repo.assets_defs_by_key.items()
        if k.to_user_string() != "training_run" and (keep is None or k in keep)
    ]
    checks = [
        c
        for c in repo.asset_checks_defs_by_key.values()
        if keep is None or all(ck.asset_key in keep for ck in c.check_keys)
    ]
    return assets + checks


def data_path(*parts: str) -> Path:
    return Path(os.environ["DECONFLOW_DATA"]).joinpath(*parts)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def free_port() -> int:
    """A loopback port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, proc=None, every: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout``
    seconds pass (the test fails naming ``what``); fails at once if ``proc`` has exited."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def slurm_test_lock(exclusive: bool):
    """A readers-writer lock over the dev SLURM cluster between test workers, writer first:
    a waiting exclusive holder closes the gate to new shared ones, then waits for the rest."""
    import fcntl
    import tempfile

    from deconflow_dev import ports

    base = Path(tempfile.gettempdir()) / f"deconflow-slurm-tests-{ports.port_base()}"
    with open(f"{base}.gate", "a") as gate, open(f"{base}.rw", "a") as rw:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(rw, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(rw, fcntl.LOCK_UN)
