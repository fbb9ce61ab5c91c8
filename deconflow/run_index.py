"""The latest Dagster run of every cell: the one index that `deconflow status`, the ``runs``
table and the watchdog read.

Per cell (keyed by its cell key; a run is tied to its cell by its ``deconflow/cell`` tag, else
by Dagster's partition tag, so runs that failed before the asset body ran count too): the
latest run's id, status, times and tags, and ``attempts``, the number of Dagster runs of
the cell.

One cache policy, public Dagster APIs only:

- The index lives in the process (per instance) and in a JSON file under the work folder
  (:data:`~deconflow.protocol.STATE_CACHE`), so a new process (the CLI, a run worker) starts
  from the last one's view. The file is rewritten when something changed, at most every
  :data:`PERSIST_S` by a long-lived process (the code server's sensor).
- A refresh asks the instance only for the runs updated since the newest update it has seen
  (``RunsFilter(updated_after=...)``; for writers' clocks and commit lag, once a minute from
  :data:`OVERLAP_S` before): a new run, a status change and new tags all move a run's update
  time. So its cost follows what changed, not the sweep's history.
- Deleted runs are noticed by one count (``get_runs_count``, with the once-a-minute re-read):
  fewer runs than the index has seen means some were deleted, and the index is rebuilt from
  every run (also the first build, and on a new instance or storage).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dagster as dg

from deconflow.atomic import atomic_write_json
from deconflow.failures import CANCELLED as CANCELLED_CLASS
from deconflow.failures import UNKNOWN
from deconflow.protocol import (
    CANCELLED,
    CELL_TAG,
    FAILED,
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    LIVE_STATUSES,
    PARTITION_TAG,
    SLURM_JOB_TAG,
    STATE_CACHE,
    SWEEP_TAG,
    cell_key_of_tags,
    cell_state,
    run_state,
)
from deconflow.settings import work_dir

# A refresh re-reads the runs updated a little before the newest update it has seen
# (NEAR_S), and once a minute (WIDE_S) those updated up to OVERLAP_S before the newest seen at
# the previous wide read: an update committed late, or stamped by a writer whose clock lags,
# shows within a minute, and a refresh in between costs only what changed.
OVERLAP_S = 60.0
NEAR_S = 2.0
WIDE_S = 60.0
PERSIST_S = 300.0  # a process rewrites the cache file at most this often (first call: now)
VERSION = 1
# Tags kept for a finished latest run (a run in flight keeps all of its tags: the watchdog
# needs its compute tags to cancel it).
KEPT_TAGS = (
    SWEEP_TAG,
    CELL_TAG,
    PARTITION_TAG,
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    SLURM_JOB_TAG,
)


def _ts(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if value.tzinfo is None:  # the run storage keeps naive UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


@dataclass
class LatestRun:
    """The latest run of one cell."""

    cell: str
    partition: str | None
    run_id: str
    status: str  # DagsterRunStatus value
    created: float
    updated: float | None
    started: float | None
    tags: dict[str, str] = field(default_factory=dict)
    attempts: int = 1

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES


@dataclass
class _Index:
    cells: dict[str, LatestRun] = field(default_factory=dict)
    runs: dict[str, list[str]] = field(default_factory=dict)  # cell -> its run ids
    others: list[str] = field(default_factory=list)  # run ids of runs without a cell
    cursor: float = 0.0  # the newest update time seen
    wide_cursor: float = 0.0  # the cursor at the last wide re-read
    wide_at: float = -1e18  # monotonic time of the last wide re-read (this process)
    owner: str = ""  # which instance and storage the index describes
    saved: float = -1e18  # monotonic time of the last write of the file (this process)
    mtime: float | None = None  # the file's mtime when this process last read or wrote it
    dirty: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def seen(self) -> int:
        return sum(len(v) for v in self.runs.values()) + len(self.others)


_INDEXES: dict[str, _Index] = {}


def _owner(instance: dg.DagsterInstance) -> str:
    """Which instance the index belongs to (a new DAGSTER_HOME or database starts afresh)."""
    storage = instance.run_storage
    where = next(
        (
            str(getattr(storage, a))
            for a in ("_conn_string", "postgres_url", "mysql_url")
            if getattr(storage, a, None)
        ),
        "",
    )
    return f"{getattr(instance, 'root_directory', '')}|{type(storage).__name__}|{where}"


def _load(index: _Index, cache: Path, owner: str) -> None:
    """Take the file's view if another process wrote it since this one last looked."""
    try:
        mtime = cache.stat().st_mtime
    except OSError:
        return
    if index.mtime == mtime and index.owner == owner:
        return
    try:
        saved = json.loads(cache.read_text())
    except (OSError, ValueError):
        return
    if saved.get("version") != VERSION or saved.get("owner") != owner:
        return
    if saved.get("cursor", 0.0) < index.cursor and index.owner == owner:
        return  # this process is ahead of the file
    index.cells = {k: LatestRun(**v) for k, v in saved["cells"].items()}
    index.runs = saved["runs"]
    index.others, index.cursor, index.owner = saved["others"], saved["cursor"], owner
    index.mtime = mtime


def _save(index: _Index, cache: Path, force: bool) -> None:
    if not index.dirty or (not force and time.monotonic() - index.saved < PERSIST_S):
        return
    payload = {
        "version": VERSION,
        "owner": index.owner,
        "cursor": index.cursor,
        "cells": {k: asdict(v) for k, v in index.cells.items()},
        "runs": index.runs,
        "others": index.others,
    }
    try:
        atomic_write_json(cache, payload)
        index.mtime = cache.stat().st_mtime
    except OSError:
        return  # a read-only data folder: the index is right, only the next process pays more
    index.saved, index.dirty = time.monotonic(), False


def _take(index: _Index, rec) -> bool:
    """Fold one run record into the index; whether the index changed."""
    run = rec.dagster_run
    cell = cell_key_of_tags(run.tags)
    if not cell:
        if run.run_id in index.others:
            return False
        index.others.append(run.run_id)
        return True
    ids = index.runs.setdefault(cell, [])
    changed = run.run_id not in ids
    if changed:
        ids.append(run.run_id)
    live = run.status.value in LIVE_STATUSES
    tags = dict(run.tags) if live else {k: run.tags[k] for k in KEPT_TAGS if k in run.tags}
    created = _ts(rec.create_timestamp) or 0.0
    updated = _ts(rec.update_timestamp)
    if updated and updated > index.cursor:
        index.cursor, changed = updated, True
    old = index.cells.get(cell)
    if old is not None and (created, run.run_id) < (old.created, old.run_id):
        if old.attempts != len(ids):
            old.attempts, changed = len(ids), True
        return changed
    entry = LatestRun(
        cell,
        run.tags.get(PARTITION_TAG),
        run.run_id,
        run.status.value,
        created,
        updated,
        rec.start_time,
        tags,
        len(ids),
    )
    if old != entry:
        index.cells[cell] = entry
        changed = True
    return changed


def _refresh(index: _Index, instance: dg.DagsterInstance, owner: str) -> None:
    rebuild = index.owner != owner or not index.cursor
    wide = rebuild or time.monotonic() - index.wide_at >= WIDE_S
    if wide and not rebuild and instance.get_runs_count(dg.RunsFilter()) < index.seen:
        rebuild = True  # runs were deleted (looked for once a minute: a count of every run)
    if rebuild:
        index.cells, index.runs, index.others, index.cursor = {}, {}, [], 0.0
        index.owner, index.dirty = owner, True
        filt = dg.RunsFilter()
    else:
        since = (index.wide_cursor or index.cursor) - OVERLAP_S if wide else index.cursor - NEAR_S
        filt = dg.RunsFilter(updated_after=dt.datetime.fromtimestamp(since, dt.UTC))
    if wide:
        index.wide_cursor, index.wide_at = index.cursor, time.monotonic()
    for rec in instance.get_run_records(filt, ascending=True):
        if _take(index, rec):
            index.dirty = True


def latest_runs(instance: dg.DagsterInstance, cache: Path | None = None) -> dict[str, LatestRun]:
    """Per cell key its latest run, fresh from the instance (see the module's cache policy).

    ``cache`` is the index's file (default: under the work folder). The runs returned are
    the index's own: read them, do not change them.
    """
    cache = Path(cache) if cache is not None else work_dir() / STATE_CACHE
    owner = _owner(instance)
    index = _INDEXES.setdefault(f"{owner}|{cache}", _Index())
    with index.lock:
        _load(index, cache, owner)
        _refresh(index, instance, owner)
        _save(index, cache, force=False)  # a process's first save is never held back
        return dict(index.cells)


def clear() -> None:
    """Forget this process's indexes (the files stay)."""
    _INDEXES.clear()


# --- the consumers' views -----------------------------------------------------------------
def cell_state_of(run: LatestRun) -> dict:
    """What the runs table shows of a cell's latest run."""
    failure = run.tags.get(FAILURE_CLASS_TAG) or (
        CANCELLED_CLASS if run_state(run.status) == CANCELLED else None
    )
    status = cell_state(run.status)
    if status == FAILED and not failure:
        failure = UNKNOWN
    return {
        "status": status,
        "run_id": run.run_id,
        "failure_class": failure,
        "reason": run.tags.get(FAILURE_REASON_TAG),
        "slurm_job_id": run.tags.get(SLURM_JOB_TAG),
        "created": run.created,
        "updated": run.updated,
        "attempts": run.attempts,
    }


def partition_states(
    instance: dg.DagsterInstance, sweep: str, cache: Path | None = None
) -> dict[str, dict]:
    """Per cell key of ``sweep``: status (running|failed|succeeded) of its latest run, run id,
    failure class and reason, SLURM job id, and ``attempts`` (the Dagster runs of the cell).

    A cell whose latest run names another sweep is left out; one without a sweep tag yet (a
    run that failed before its asset body ran) counts.
    """
    return {
        k: cell_state_of(r)
        for k, r in latest_runs(instance, cache).items()
        if r.tags.get(SWEEP_TAG, sweep) == sweep
    }
