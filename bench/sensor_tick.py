"""Watchdog tick time at 10,000 cells with several runs per cell (issue 11, item 5: <= 0.2 s).

Builds a throw-away SQLite Dagster instance (the repo's default storage) holding run records
for every cell of a 10,000-cell grid (4 variants x 5 lr x 5 wd x 100 seeds): per cell
``runs-per-cell - 1`` earlier failed attempts (every class) and a latest run that succeeded,
failed, is queued, or is training (128 GPU slots' worth, with heartbeat files, a few stale).
The records are bulk-inserted through the run storage (as ``instance.add_run`` writes them,
in one transaction). Then it times the real sensor, evaluated with
``dg.build_sensor_context`` (run-worker orphan check included), over several ticks: the first
with an empty cursor (every failed cell is classified and decided once), then steady ticks.
``--baseline`` also times the old tick's first step, a read of every run of the sweep.

    python -m bench.sensor_tick [--cells 10000] [--runs-per-cell 4] [--ticks 10] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from deconflow import procs
from deconflow.partitions import partition_key
from deconflow.protocol import (
    CELL_TAG,
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    HEARTBEAT,
    PID_TAG,
    SWEEP_TAG,
    TRAIN_LOG,
    WORKER_TAG,
)
from deconflow.resources import LocalProcessResource
from deconflow.sensors import (
    AlertWebhook,
    WatchdogSettings,
    build_watchdog_sensor,
    evaluate_tick,
)
from deconflow.sweep import Grid

CLASSES = ["oom", "timeout", "node_fail", "unknown", "preempted", "killed_by_signal"]


def big_grid(cells: int) -> Grid:
    seeds = max(1, cells // 100)
    return Grid(
        ("base", "bn_off", "narrow", "adamw"),
        (0.02, 0.05, 0.1, 0.2, 0.4),
        (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        tuple(range(seeds)),
        name="bench-sweep",
    )


def populate(
    instance: dg.DagsterInstance,
    data: Path,
    grid: Grid,
    runs_per_cell: int,
    slots: int = 128,
    queued: int = 500,
    failed_every: int = 20,
) -> dict[str, int]:
    """Bulk-insert the run records; returns counts by kind."""
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.storage.runs.schema import RunsTable, RunTagsTable

    storage = instance.run_storage
    total = len(grid) * runs_per_cell
    t0 = datetime.now(UTC) - timedelta(seconds=0.1 * total)  # the latest runs: recent
    me = procs.identity()  # a live "run worker", so the orphan check finds none
    runs, tags, counts = [], [], {"runs": 0, "started": 0, "queued": 0, "failed": 0}
    n = 0

    def add(tags_: dict, status: dg.DagsterRunStatus, started: bool) -> None:
        nonlocal n
        run = DagsterRun(
            job_name="train_cells", run_id=str(uuid.uuid4()), status=status, tags=tags_
        )
        when = t0 + timedelta(seconds=0.1 * n)
        row = storage._get_run_insertion_values(run, when)
        row["update_timestamp"] = when + timedelta(seconds=1)
        row["start_time"] = when.timestamp() if started else None  # same keys in every row
        runs.append(row)
        tags.extend(
            {"run_id": run.run_id, "key": k, "value": v} for k, v in run.tags_for_storage().items()
        )
        n += 1

    cells = grid.cells
    started_at = {i * len(cells) // slots for i in range(slots)}
    for i, cell in enumerate(cells):
        base = {
            SWEEP_TAG: grid.name,
            CELL_TAG: cell.key,
            "dagster/partition": str(partition_key(cell)),
        }
        for j in range(runs_per_cell - 1):  # earlier attempts, all failed
            cls = CLASSES[(i + j) % len(CLASSES)]
            add({**base, FAILURE_CLASS_TAG: cls, FAILURE_REASON_TAG: "x"}, _F, True)
        if i in started_at:
            work = data / "work" / cell.key
            work.mkdir(parents=True, exist_ok=True)
            stale = i % 16 == 0  # a few stuck ones: no heartbeat for two hours
            beat = {"step": 50, "epoch": 1.0, "total_steps": 500, "time": time.time()}
            if stale:
                beat["time"] -= 7200
            (work / HEARTBEAT).write_text(json.dumps(beat))
            (work / TRAIN_LOG).write_text("progress step 50\n" * 50)
            add({**base, WORKER_TAG: me, PID_TAG: "999999"}, dg.DagsterRunStatus.STARTED, True)
            counts["started"] += 1
        elif i % failed_every == 13 and counts["queued"] < queued:
            add(dict(base), dg.DagsterRunStatus.NOT_STARTED, False)  # queued
            counts["queued"] += 1
        elif i % failed_every == 7:
            cls = CLASSES[(i // failed_every) % len(CLASSES)]
            add({**base, FAILURE_CLASS_TAG: cls, FAILURE_REASON_TAG: "y"}, _F, True)
            counts["failed"] += 1
        else:
            add(dict(base), dg.DagsterRunStatus.SUCCESS, True)
    with storage.connect() as conn:
        for k in range(0, len(runs), 5000):
            conn.execute(RunsTable.insert(), runs[k : k + 5000])
        for k in range(0, len(tags), 20000):
            conn.execute(RunTagsTable.insert(), tags[k : k + 20000])
    counts["runs"] = n
    return counts


_F = dg.DagsterRunStatus.FAILURE


def index_times(instance: dg.DagsterInstance) -> None:
    """The latest-run index (deconflow.run_index) alone: a rebuild from every run, a new
    process starting from the index file, and a refresh in a process that holds it."""
    from deconflow import run_index
    from deconflow.protocol import STATE_CACHE
    from deconflow.settings import work_dir

    def timed() -> float:
        t0 = time.perf_counter()
        run_index.latest_runs(instance)
        return time.perf_counter() - t0

    run_index.clear()
    (work_dir() / STATE_CACHE).unlink(missing_ok=True)
    rebuild = timed()
    size = (work_dir() / STATE_CACHE).stat().st_size
    run_index.clear()
    from_file = timed()
    steady = statistics.median(timed() for _ in range(5))
    wide_s, run_index.WIDE_S = run_index.WIDE_S, 0.0
    wide = timed()  # the once-a-minute re-read of the last minute's updates
    run_index.WIDE_S = wide_s
    print(
        f"index: rebuild from every run {rebuild:.2f}s (file {size / 1e6:.1f} MB), "
        f"new process from the file {from_file:.3f}s, refresh in process {steady:.3f}s, "
        f"once-a-minute wide refresh {wide:.3f}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--runs-per-cell", type=int, default=4)
    ap.add_argument("--ticks", type=int, default=10)
    ap.add_argument("--baseline", action="store_true", help="also time a read of every run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sensor-bench-"))
    os.environ["DECONFLOW_DATA"] = str(tmp / "data")
    (tmp / "home").mkdir()
    grid = big_grid(args.cells)
    with dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
        t = time.perf_counter()
        counts = populate(instance, tmp / "data", grid, args.runs_per_cell)
        print(f"populated {counts} in {time.perf_counter() - t:.0f}s", flush=True)
        sensor = build_watchdog_sensor(grid, WatchdogSettings(stuck_after_s=3600))
        resources = {"compute": LocalProcessResource(), "alerts": AlertWebhook()}
        times, cursor, first = [], None, None
        for i in range(args.ticks):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
            t0 = time.perf_counter()
            result = sensor(ctx)
            times.append(time.perf_counter() - t0)
            cursor = result.cursor
            if i == 0:
                first = result
        reqs = len(first.run_requests or [])
        steady = times[1:] or times
        # evaluate_tick alone (without the run-worker orphan check and resource set-up)
        core = []
        for _ in range(args.ticks):
            t0 = time.perf_counter()
            cursor = evaluate_tick(
                instance, grid.name, cursor, WatchdogSettings(), grid=grid
            ).cursor
            core.append(time.perf_counter() - t0)
        print(
            "| cells | runs | in flight | failed latest | ticks | first tick, cold cursor (s) "
            "| steady median (s) | steady max (s) | evaluate_tick median (s) | requests on tick 1 "
            "| cursor bytes |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print(
            f"| {len(grid)} | {counts['runs']} | {counts['started']} + {counts['queued']} queued "
            f"| {counts['failed']} | {len(times)} | {times[0]:.3f} | "
            f"{statistics.median(steady):.3f} | {max(steady):.3f} | "
            f"{statistics.median(core):.3f} | {reqs} | {len(cursor or '')} |"
        )
        index_times(instance)
        if args.baseline:
            t0 = time.perf_counter()
            recs = instance.get_run_records(
                dg.RunsFilter(tags={SWEEP_TAG: grid.name}), limit=1_000_000
            )
            print(f"baseline: reading all {len(recs)} runs took {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
