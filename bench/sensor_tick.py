"""Watchdog tick time with all 216 partitions in play (target: well under 1 s per tick).

Builds a throw-away SQLite Dagster instance (the repo's default storage) holding run records
for every cell of the grid: most succeeded, some failed with each class and earlier attempts,
some running with heartbeat files (fresh and stale), then times the real sensor, evaluated
with ``dg.build_sensor_context``, over several ticks.

    python -m bench.sensor_tick [--runs-per-cell 3] [--ticks 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
from dagster._core.test_utils import create_run_for_test

from deconflow.partitions import partition_key
from deconflow.resources import LocalProcessResource
from deconflow.sensors import AlertWebhook, WatchdogSettings, build_watchdog_sensor
from deconflow.sweep import load_grid

CLASSES = ["oom", "timeout", "node_fail", "unknown", "diverged", "preempted"]


def populate(instance: dg.DagsterInstance, data: Path, runs_per_cell: int) -> int:
    grid = load_grid()
    n = 0
    for i, cell in enumerate(grid.cells):
        tags = {
            "deconflow/sweep": grid.name,
            "deconflow/cell": cell.key,
            "dagster/partition": str(partition_key(cell)),
        }
        for _ in range(runs_per_cell - 1):  # earlier attempts
            failed = {**tags, "deconflow/failure_class": CLASSES[i % len(CLASSES)]}
            create_run_for_test(
                instance, "train_cells", status=dg.DagsterRunStatus.FAILURE, tags=failed
            )
            n += 1
        kind = i % 6
        status = {
            0: dg.DagsterRunStatus.FAILURE,
            1: dg.DagsterRunStatus.STARTED,
            2: dg.DagsterRunStatus.STARTED,
        }.get(kind, dg.DagsterRunStatus.SUCCESS)
        last = dict(tags)
        if kind == 0:
            last["deconflow/failure_class"] = CLASSES[(i // 6) % len(CLASSES)]
        if kind in (1, 2):
            work = data / "work" / cell.key
            work.mkdir(parents=True, exist_ok=True)
            age = 10 if kind == 1 else 7200  # fresh, or stale (stuck: no pid, nothing to kill)
            beat = {"step": 5, "time": time.time() - age}
            (work / "heartbeat.json").write_text(json.dumps(beat))
            (work / "train.log").write_text("step 5\n" * 50)
        create_run_for_test(instance, "train_cells", status=status, tags=last)
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-per-cell", type=int, default=3)
    ap.add_argument("--ticks", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sensor-bench-"))
    os.environ["DECONFLOW_DATA"] = str(tmp / "data")
    (tmp / "home").mkdir()
    grid = load_grid()
    with dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
        n = populate(instance, tmp / "data", args.runs_per_cell)
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
        print(
            "| cells | runs | ticks | first tick (s) | median (s) | p95 (s) | max (s) | "
            "requests on tick 1 | cursor bytes |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        p95 = sorted(times)[max(0, int(0.95 * len(times)) - 1)]
        print(
            f"| {len(grid.cells)} | {n} | {len(times)} | {times[0]:.3f} | "
            f"{statistics.median(times[1:] or times):.3f} | {p95:.3f} | {max(times):.3f} | "
            f"{reqs} | {len(cursor or '')} |"
        )


if __name__ == "__main__":
    main()
