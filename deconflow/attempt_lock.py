"""One attempt per partition at a time: an exclusive lock per cell, held by the run worker.

Two Dagster runs of one partition (a backfill and a user's rerun, say) would otherwise share
its work folder, and the fresh one would clear it under the other. The lock is an ``flock`` on
a side file, so a run worker that dies releases it with its process; the orchestrator is one
host, so the lock lives on that host's view of the work folder.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deconflow import procs


class AttemptInProgress(RuntimeError):
    """Another live attempt holds this partition; the message is one line."""


@contextmanager
def attempt_lock(lock_dir: Path, cell_key: str, run_id: str) -> Iterator[None]:
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{cell_key}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(Path(path).read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            raise AttemptInProgress(
                f"another attempt of {cell_key} is running (Dagster run "
                f"{holder.get('run_id', '?')}, process {holder.get('worker', '?')}); "
                "not starting a second one"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run_id": run_id, "worker": procs.identity()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
