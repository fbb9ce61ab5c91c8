"""``deconflow demo``: the demo profile's sweep through real Dagster runs on the
persistent instance, then the analysis, with a progress bar and a short report."""

from __future__ import annotations

import os
import time

from deconflow import settings
from deconflow.materialize import analyse, materialize_cells
from deconflow.sweep import Cell, Grid

EXAMPLE_QUERIES = [
    (
        "Best validation CE per variant",
        "SELECT variant, count(*) AS runs, round(avg(best_val_ce), 4) AS mean_best_val_ce, "
        "round(min(best_val_ce), 4) AS best FROM run_fits GROUP BY variant ORDER BY variant",
    ),
    (
        "Power-law quality: runs with R² >= 0.98 per variant",
        "SELECT variant, count(*) FILTER (WHERE r_squared >= 0.98) AS good_fits, count(*) AS runs "
        "FROM run_fits GROUP BY variant ORDER BY variant",
    ),
    (
        "Loss curve of one run, every 50th step",
        "SELECT run_id, step, round(epoch, 2) AS epoch, round(loss_nats, 4) AS loss "
        "FROM batch_metrics WHERE run_id = (SELECT min(run_id) FROM runs WHERE status = "
        "'materialized') AND step % 50 = 0 ORDER BY step LIMIT 5",
    ),
]


def demo_cells(grid: Grid, per_variant_seeds: int = 2, all_cells: bool = False) -> list[Cell]:
    """Default: every variant x every lr x the middle weight decay x the first seeds."""
    if all_cells:
        return grid.cells
    wds = sorted(grid.weight_decays)
    wd = wds[len(wds) // 2]
    seeds = sorted(grid.seeds)[:per_variant_seeds]
    return [Cell(v, lr, wd, s) for v in grid.variants for lr in sorted(grid.lrs) for s in seeds]


def run_demo(workers: int = 2, all_cells: bool = False, seeds: int = 2) -> int:
    import dagster as dg

    from deconflow.instance import ensure_dagster_home

    os.environ.setdefault("DECONFLOW_PROFILE", "demo")
    home = ensure_dagster_home(pools=False)  # materialize_cells sets the pools
    from deconflow.status import format_grid, live_runs_table, run_sql
    from deconflow.sweep import load_grid

    grid = load_grid()
    cells = demo_cells(grid, seeds, all_cells)
    print(
        f"deconflow demo: {len(cells)} cells of {len(grid)} ({len(grid.variants)} variants), "
        f"profile {settings.raw('DECONFLOW_PROFILE')}, {workers} at a time, "
        f"Dagster home {home}"
    )
    t0 = time.monotonic()
    failed = materialize_cells(cells, workers, launched_by="deconflow demo")
    ok, checks = analyse(launched_by="deconflow demo")
    with dg.DagsterInstance.get() as instance:
        runs = live_runs_table(grid, instance)

    print("\n== completeness (variant x hp) ==")
    print(format_grid(grid, runs))
    for name, ev in checks.items():
        verdict = ev["metadata"].get("verdict")
        print(
            f"check {name}: {'passed' if ev['passed'] else 'failed'}"
            + (f" ({verdict})" if verdict else "")
            + (f" - {ev['description']}" if ev["description"] else "")
        )
        for key, value in ev["metadata"].items():
            if isinstance(value, str) and value.startswith("FAIL"):
                print(f"  gate {key}: {value}")

    print("\n== hypotheses ==")
    from deconflow.analysis.hypotheses import format_verdicts, verdict_table

    print(format_verdicts(verdict_table(run_sql("SELECT * FROM hypotheses"))))
    excl = run_sql("SELECT count(*) AS n FROM hypotheses_excluded").iloc[0, 0]
    print(f"({excl} exclusions; every row, with notes, in the hypotheses table)")

    print("\n== try these queries ==")
    for title, sql in EXAMPLE_QUERIES:
        print(f'-- {title}\ndeconflow sql "{sql}"')
        print(run_sql(sql).to_string(index=False), "\n")
    total = time.monotonic() - t0
    print(
        f"demo finished in {total:.0f}s. Browse it: `deconflow dev` then open "
        "http://localhost:3000 (assets, partitions, runs, checks)."
    )
    return 0 if ok and not failed else 1
