"""The ``deconflow`` command: train one cell, list the grid, run the demo, query DuckDB."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deconflow.sweep import Cell, GridError, load_grid, parse_key


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
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.grad_accum:
        overrides["grad_accum"] = args.grad_accum
    if args.device:
        overrides["device"] = args.device
    cfg = get_profile(args.profile, **overrides)
    out = Path(args.out) if args.out else Path("data") / "runs" / cell.key
    # Validate the data before anything is written.
    from deconflow.training.data import load_dataset

    load_dataset(cfg)
    from deconflow.training.run import run_cell, set_torch_threads

    set_torch_threads()
    summary = run_cell(cell, cfg, out)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    for cell in grid.cells:
        print(cell.key)
    print(f"# {len(grid)} cells", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from deconflow.demo import run_demo

    return run_demo(workers=args.workers, all_cells=args.all, seeds=args.seeds)


def cmd_materialize(args: argparse.Namespace) -> int:
    from deconflow.instance import ensure_dagster_home
    from deconflow.materialize import analyse, materialize_cells

    grid = load_grid()
    cells = grid.cells
    if args.key:
        cells = [parse_key(k) for k in args.key]
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
    else:
        print(df.to_string(index=False, max_rows=args.max_rows))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    import os

    from deconflow.instance import ensure_dagster_home

    home = ensure_dagster_home()
    print(f"DAGSTER_HOME={home}", file=sys.stderr)
    cmd = ["dagster", "dev", "-m", "deconflow.definitions", *args.dagster_args]
    os.execvp(cmd[0], cmd)


def cmd_slurm(args: argparse.Namespace) -> int:
    from deconflow_dev.slurm_cluster import main as cluster_main

    return cluster_main([args.action, *args.rest])


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
    t.add_argument("--out", help="output folder (default data/runs/<key>)")
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

    q = sub.add_parser("sql", help="run SQL read-only on the DuckDB database")
    q.add_argument("query")
    q.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    q.add_argument("--max-rows", type=int, default=200)
    q.set_defaults(func=cmd_sql)

    v = sub.add_parser("dev", help="dagster dev with the persistent DAGSTER_HOME")
    v.add_argument("dagster_args", nargs=argparse.REMAINDER)
    v.set_defaults(func=cmd_dev)

    c = sub.add_parser("slurm", help="the local one-node SLURM cluster: up | down | status")
    c.add_argument("action", choices=["up", "down", "status", "env"])
    c.add_argument("rest", nargs=argparse.REMAINDER)
    c.set_defaults(func=cmd_slurm)
    return p


def main(argv: list[str] | None = None) -> int:
    from deconflow.training.data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (GridError, DataError) as e:
        print(f"deconflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deconflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
