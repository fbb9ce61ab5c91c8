"""The ``deconflow`` command: train one cell, list the grid, run the demo, query DuckDB."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from deconflow.keys import parse_key
from deconflow.sweep import Cell, GridError, load_grid


def _cell_from_args(args: argparse.Namespace) -> Cell:
    by_parts = [args.variant, args.lr, args.wd, args.seed]
    if args.key and any(v is not None for v in by_parts):
        raise GridError("give either --key or --variant/--lr/--wd/--seed, not both")
    if args.key:
        return parse_key(args.key)
    if any(v is None for v in by_parts):
        raise GridError("give --key, or all of --variant, --lr, --wd and --seed")
    return Cell(args.variant, args.lr, args.wd, args.seed)


def cmd_train(args: argparse.Namespace) -> int:
    from deconflow.profiles import get_profile

    cell = _cell_from_args(args)
    overrides = {}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    # `is not None`: an explicit 0 is bad input (a one-line error), never "use the default".
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.grad_accum is not None:
        overrides["grad_accum"] = args.grad_accum
    if args.device is not None:
        overrides["device"] = args.device
    cfg = get_profile(args.profile, **overrides)  # validates every value
    # Validate the data before anything is written.
    from deconflow.training.data import load_dataset

    load_dataset(cfg)
    from deconflow.training.run import run_cell, set_torch_threads

    set_torch_threads()
    if args.out:
        summary = run_cell(cell, cfg, Path(args.out))
    else:
        summary = _train_and_publish(cell, cfg, run_cell)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _train_and_publish(cell: Cell, cfg, run_cell) -> dict:
    """Train in the cell's work folder, then publish it whole: the published folder
    ``$DECONFLOW_DATA/runs/<key>`` is only ever replaced by a finished run, never written
    into (a killed command leaves it as it was; the next one resumes from the work folder)."""
    from deconflow.attempt_lock import AttemptInProgress, attempt_lock
    from deconflow.protocol import LOCK_DIR
    from deconflow.settings import runs_dir, work_dir
    from deconflow.warehouse.publish import publish_run

    work = work_dir() / cell.key
    try:
        with attempt_lock(work_dir() / LOCK_DIR, cell.key, f"deconflow train (pid {os.getpid()})"):
            print(
                f"training in {work}; published to {runs_dir() / cell.key} when it ends",
                file=sys.stderr,
            )
            summary = run_cell(cell, cfg, work)
            published = publish_run(work, runs_dir())
            shutil.rmtree(work, ignore_errors=True)  # published: the next train starts fresh
    except AttemptInProgress as e:
        raise GridError(str(e)) from None
    return {**summary, "published": str(published)}


def cmd_grid(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    for cell in grid.cells:
        print(cell.key)
    print(f"# {len(grid)} cells", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from deconflow.demo import run_demo

    if args.workers < 1 or args.seeds < 1:
        raise GridError(f"--workers and --seeds must be >= 1, got {args.workers}, {args.seeds}")

    return run_demo(workers=args.workers, all_cells=args.all, seeds=args.seeds)


def cmd_materialize(args: argparse.Namespace) -> int:
    from deconflow.instance import ensure_dagster_home
    from deconflow.materialize import analyse, materialize_cells

    if args.workers < 1:
        raise GridError(f"--workers must be >= 1, got {args.workers}")
    grid = load_grid()
    cells = grid.cells
    if args.key:
        cells = [parse_key(k) for k in args.key]
        outside = [c.key for c in cells if c not in grid]
        if outside:
            raise GridError(
                f"cell(s) not in the grid {grid.name} ({len(grid)} cells): {', '.join(outside)}; "
                "add their values to the grid file first"
            )
    for name, values in (
        ("variant", args.variant),
        ("lr", args.lr),
        ("weight_decay", args.wd),
        ("seed", args.seed),
    ):
        if values:
            cells = [c for c in cells if getattr(c, name) in values]
    if not cells:
        raise GridError("the selection matches no cell of the grid")
    import dagster as dg

    from deconflow.resources import compute_from_env, sweep_from_env

    compute_from_env()  # a bad DECONFLOW_COMPUTE / slurm.toml: one line, before any run
    where = "training settings (DECONFLOW_PROFILE, DECONFLOW_TRAIN_OVERRIDES)"
    try:  # e.g. checkpoint_every 0: refused here, not as a crash in every run
        sweep_from_env().overrides()
    except dg.Failure as e:
        raise GridError(f"{where}: {e.description}") from None
    except (GridError, TypeError) as e:  # a bad value, an unknown TrainConfig field
        raise GridError(f"{where}: {e}") from None
    ensure_dagster_home()
    print(f"materializing {len(cells)} partition(s), {args.workers} at a time")
    failed = materialize_cells(cells, args.workers)
    ok = True
    if not args.no_analysis:
        ok, _ = analyse()
    return 0 if ok and not failed else 1


def cmd_status(args: argparse.Namespace) -> int:
    import dagster as dg

    from deconflow.instance import ensure_dagster_home
    from deconflow.status import format_grid, live_runs_table

    ensure_dagster_home()
    grid = load_grid()
    with dg.DagsterInstance.get() as instance:
        print(format_grid(grid, live_runs_table(grid, instance)))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from deconflow.status import NoDatabase, run_sql

    try:
        df = run_sql(args.query)
    except NoDatabase as e:
        raise GridError(str(e)) from None
    except duckdb.Error as e:
        raise GridError(f"SQL error: {str(e).splitlines()[0]}") from None
    if args.csv:
        df.to_csv(sys.stdout, index=False)
    elif df.empty:
        cols = ", ".join(map(str, df.columns))
        print(f"(no rows{'; columns: ' + cols if cols else ''})")
    else:
        print(df.to_string(index=False, max_rows=args.max_rows))
        if len(df) > args.max_rows:
            print(f"({len(df)} rows; --max-rows N or --csv to see more)")
    return 0


# Options of `dagster dev` that choose the code to load: given one, deconflow adds no -m.
_DAGSTER_TARGET_OPTS = (
    *("-m", "--module-name", "-f", "--python-file", "-w", "--workspace"),
    *("--package-name", "--autoload-defs-module-name", "-a", "--attribute"),
)


def _dev_command(dagster_args: list[str]) -> list[str]:
    """``dagster dev`` with every option passed through (--port, --host, ...)."""
    chosen = any(a.split("=", 1)[0] in _DAGSTER_TARGET_OPTS for a in dagster_args)
    target = [] if chosen else ["-m", "deconflow.definitions"]
    return ["dagster", "dev", *target, *dagster_args]


def cmd_dev(args: argparse.Namespace) -> int:
    from deconflow.dev_server import supervise
    from deconflow.instance import ensure_dagster_home

    home = ensure_dagster_home()
    cmd = _dev_command(args.dagster_args)
    print(f"DAGSTER_HOME={home}\n{' '.join(cmd)}", file=sys.stderr)
    return supervise(cmd)


def cmd_slurm(args: argparse.Namespace) -> int:
    from deconflow_dev.slurm_cluster import main as cluster_main

    return cluster_main([args.action, *args.rest])


def cmd_postgres(args: argparse.Namespace) -> int:
    from deconflow_dev.postgres import main as postgres_main

    return postgres_main([args.action, *args.rest])


def _sql_epilog() -> str:
    from deconflow.datadict import TABLES_HELP

    width = max(map(len, TABLES_HELP))
    lines = ["tables:"] + [f"  {k:<{width}}  {v}" for k, v in TABLES_HELP.items()]
    lines += [
        "",
        "examples:",
        '  deconflow sql "SELECT variant, count(*), avg(best_val_ce) FROM run_fits GROUP BY 1"',
        '  deconflow sql "SELECT status, count(*) FROM completeness GROUP BY 1"',
        '  deconflow sql "SELECT run_id, r_squared FROM run_fits ORDER BY r_squared LIMIT 5"',
        "  deconflow sql --csv \"SELECT * FROM batch_metrics WHERE run_id LIKE 'base__lr0.1%'\"",
        "",
        "or open it yourself, read-only: duckdb -readonly data/deconflow.duckdb",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deconflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one cell standalone")
    t.add_argument("--key", help="cell key, e.g. base__lr0.1_wd0.0001_s0")
    t.add_argument("--variant")
    t.add_argument("--lr", type=float)
    t.add_argument("--wd", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--profile", default="demo", help="full | demo | synthetic (default demo)")
    t.add_argument(
        "--out",
        help="output folder (default: train in $DECONFLOW_DATA/work/<key>, then publish to "
        "$DECONFLOW_DATA/runs/<key> when the run ends)",
    )
    t.add_argument("--data-dir", help="CIFAR-10 folder for the full profile")
    t.add_argument("--epochs", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--device", help="auto | cpu | cuda")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("grid", help="list the grid's cells")
    g.add_argument("--grid", help="grid file (default $DECONFLOW_GRID or the packaged one)")
    g.set_defaults(func=cmd_grid)

    d = sub.add_parser("demo", help="run the demo sweep through Dagster, then analyse it")
    d.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    d.add_argument("--seeds", type=int, default=2, help="seeds per cell (default 2)")
    d.add_argument("--all", action="store_true", help="every cell of the grid (216)")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser(
        "materialize",
        help="run partitions as Dagster runs (a CLI backfill), then refresh the analysis",
    )
    m.add_argument("--key", nargs="+", help="cell keys, e.g. base__lr0.1_wd0.0001_s0")
    m.add_argument("--variant", nargs="+")
    m.add_argument("--lr", nargs="+", type=float)
    m.add_argument("--wd", nargs="+", type=float)
    m.add_argument("--seed", nargs="+", type=int)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--no-analysis", action="store_true", help="skip the downstream assets")
    m.set_defaults(func=cmd_materialize)

    s = sub.add_parser("status", help="completeness grid (variant x hp) with counts")
    s.set_defaults(func=cmd_status)

    q = sub.add_parser(
        "sql",
        help="run SQL read-only on the DuckDB database",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one SQL query read-only on the published DuckDB database (the "
        "current snapshot: never blocked by a publication or another session).",
        epilog=_sql_epilog(),
    )
    q.add_argument("query", help='one SQL statement, e.g. "SELECT count(*) FROM runs"')
    q.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    q.add_argument("--max-rows", type=int, default=200)
    q.set_defaults(func=cmd_sql)

    v = sub.add_parser(
        "dev",
        help="dagster dev with the persistent DAGSTER_HOME; every option goes to dagster dev "
        "(e.g. deconflow dev --port 3001 --host 0.0.0.0)",
    )
    v.add_argument("dagster_args", nargs=argparse.REMAINDER)
    v.set_defaults(func=cmd_dev)

    c = sub.add_parser("slurm", help="the local one-node SLURM cluster: up | down | status")
    c.add_argument("action", choices=["up", "down", "status", "env"])
    c.add_argument("rest", nargs=argparse.REMAINDER)
    c.set_defaults(func=cmd_slurm)

    g = sub.add_parser(
        "postgres", help="a local PostgreSQL server for the Dagster instance: up | down | status"
    )
    g.add_argument("action", choices=["up", "down", "status", "env"])
    g.add_argument("rest", nargs=argparse.REMAINDER)
    g.set_defaults(func=cmd_postgres)
    return p


def main(argv: list[str] | None = None) -> int:
    from deconflow.slurm.script import SlurmConfigError
    from deconflow.training.data import DataError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dev"]:  # everything after `dev` belongs to `dagster dev`, even -h/--help
        return cmd_dev(argparse.Namespace(dagster_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (GridError, DataError, SlurmConfigError) as e:
        print(f"deconflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deconflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
