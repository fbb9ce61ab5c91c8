"""The ``deconflow`` command: train one cell, list the grid, run the demo, query DuckDB.

Only ``train`` imports torch: every other command starts in well under a second."""

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
    from deconflow import settings
    from deconflow.profiles import profile_from_env

    cell = _cell_from_args(args)
    settings.get("DECONFLOW_TORCH_THREADS")  # a bad value: one line, before torch loads
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
    # The profile and DECONFLOW_TRAIN_OVERRIDES as the sweep uses them; flags win.
    cfg = profile_from_env(args.profile, **overrides)  # validates every value
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
    ensure_dagster_home(pools=False)  # materialize_cells opens the instance once, with pools
    print(f"materializing {len(cells)} partition(s), {args.workers} at a time")
    failed = materialize_cells(cells, args.workers)
    ok = True
    if not args.no_analysis:
        ok, _ = analyse()
    return 0 if ok and not failed else 1


def cmd_status(args: argparse.Namespace) -> int:
    from deconflow.settings import data_root

    root = data_root()
    if not root.is_dir():  # not a project: say so, and create nothing
        raise GridError(
            f"no deconflow data folder at {root}: run in the project folder, set "
            "DECONFLOW_DATA, or start a sweep (deconflow demo) first"
        )
    import dagster as dg

    from deconflow.instance import ensure_dagster_home
    from deconflow.status import format_grid, live_runs_table, status_json, verdict_summary

    ensure_dagster_home()
    grid = load_grid()
    with dg.DagsterInstance.get() as instance:
        runs = live_runs_table(grid, instance)
    if args.json:
        print(json.dumps(status_json(grid, runs), indent=2, default=str))
    else:
        print(format_grid(grid, runs))
        print()
        print(verdict_summary())
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from deconflow.status import NoDatabase, run_sql_all

    fmt = "csv" if args.csv else args.format
    if args.max_rows < 1:
        raise GridError(f"--max-rows must be >= 1, got {args.max_rows} (--format csv: all rows)")
    try:
        frames = run_sql_all(args.query)
    except NoDatabase as e:
        raise GridError(str(e)) from None
    except duckdb.Error as e:
        raise GridError(f"SQL error: {str(e).splitlines()[0]}") from None
    if fmt != "table" and len(frames) > 1:
        raise GridError(
            f"--format {fmt} takes one SQL statement, got {len(frames)}: run them one at a time"
        )
    for i, (stmt, df) in enumerate(frames):
        if len(frames) > 1:
            print(("\n" if i else "") + f"-- [{i + 1}/{len(frames)}] {stmt}")
        if fmt == "csv":
            df.to_csv(sys.stdout, index=False)
        elif fmt == "json":
            sys.stdout.write(df.to_json(orient="records", date_format="iso", indent=2) + "\n")
        elif df.empty:
            cols = ", ".join(map(str, df.columns))
            print(f"(no rows{'; columns: ' + cols if cols else ''})")
        else:
            print(df.to_string(index=False, max_rows=args.max_rows))
            if len(df) > args.max_rows:
                print(f"({len(df)} rows; --max-rows N or --format csv to see more)")
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
        "or open it yourself, read-only, in the data folder (the metric views read their",
        "Parquet parts relative to it): cd data && duckdb -readonly deconflow.duckdb",
    ]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deconflow")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (the metadata scan costs every command
    about 0.1 s)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"deconflow {_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def _service_parser(sub, name: str, help: str, description: str, rest_help: str, func) -> None:
    """``deconflow slurm|postgres ACTION [OPTIONS]``: a dev service, its options passed on."""
    c = sub.add_parser(name, help=help, description=description)
    c.add_argument("action", choices=["up", "down", "status", "env"], help="what to do")
    c.add_argument("rest", nargs=argparse.REMAINDER, metavar="OPTIONS", help=rest_help)
    c.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deconflow",
        description=__doc__,
        epilog="settings: DECONFLOW_* environment variables, see docs/configuration.md",
    )
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train one cell standalone",
        description="Train one cell outside Dagster (the same code a sweep run executes), "
        "with the profile and DECONFLOW_TRAIN_OVERRIDES the sweep would use; flags win.",
    )
    t.add_argument("--key", help="cell key, e.g. base__lr0.1_wd0.0001_s0")
    t.add_argument("--variant", help="variant (base, bn_off, narrow, adamw), with --lr/--wd/--seed")
    t.add_argument("--lr", type=float, help="learning rate of the cell")
    t.add_argument("--wd", type=float, help="weight decay of the cell")
    t.add_argument("--seed", type=int, help="seed of the cell")
    t.add_argument(
        "--profile",
        default=None,
        help="full | demo | synthetic (default $DECONFLOW_PROFILE, else demo)",
    )
    t.add_argument(
        "--out",
        help="output folder (default: train in $DECONFLOW_DATA/work/<key>, then publish to "
        "$DECONFLOW_DATA/runs/<key> when the run ends)",
    )
    t.add_argument("--data-dir", help="CIFAR-10 folder for the full profile")
    t.add_argument("--epochs", type=int, help="epochs (overrides the profile)")
    t.add_argument(
        "--grad-accum", type=int, help="micro-batches per step (the effective batch is kept)"
    )
    t.add_argument("--device", help="auto | cpu | cuda")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser(
        "grid", help="list the grid's cells", description="Print every cell key of the grid."
    )
    g.add_argument("--grid", help="grid file (default $DECONFLOW_GRID or the packaged one)")
    g.set_defaults(func=cmd_grid)

    d = sub.add_parser(
        "demo",
        help="run the demo sweep through Dagster, then analyse it",
        description="Materialize the demo cells (24 by default) on the persistent instance, "
        "then the analysis assets; prints the grid, H1/H2 and example queries.",
    )
    d.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    d.add_argument("--seeds", type=int, default=2, help="seeds per cell (default 2)")
    d.add_argument("--all", action="store_true", help="every cell of the grid (216)")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser(
        "materialize",
        help="run partitions as Dagster runs (a CLI backfill), then refresh the analysis",
        description="Run the selected partitions (default: the whole grid) as Dagster runs "
        "on the persistent instance, then materialize the analysis assets.",
    )
    m.add_argument("--key", nargs="+", help="cell keys, e.g. base__lr0.1_wd0.0001_s0")
    m.add_argument("--variant", nargs="+", help="only these variants")
    m.add_argument("--lr", nargs="+", type=float, help="only these learning rates")
    m.add_argument("--wd", nargs="+", type=float, help="only these weight decays")
    m.add_argument("--seed", nargs="+", type=int, help="only these seeds")
    m.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    m.add_argument("--no-analysis", action="store_true", help="skip the downstream assets")
    m.set_defaults(func=cmd_materialize)

    s = sub.add_parser(
        "status",
        help="completeness grid (variant x hp) with counts",
        description="The live state of every cell (Dagster instance + published runs), as a "
        "grid, or as JSON for scripts. Refuses to run outside a project (no data folder).",
    )
    s.add_argument(
        "--json", action="store_true", help="print counts and one object per cell as JSON"
    )
    s.set_defaults(func=cmd_status)

    q = sub.add_parser(
        "sql",
        help="run SQL read-only on the DuckDB database",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run SQL read-only on the published DuckDB database (the current "
        "snapshot: never blocked by a publication or another session). Several statements "
        "separated by ';' print one result each (table format only).",
        epilog=_sql_epilog(),
    )
    q.add_argument("query", help='SQL, e.g. "SELECT count(*) FROM runs"')
    q.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="output format (default table; csv and json print every row)",
    )
    q.add_argument("--csv", action="store_true", help="same as --format csv")
    q.add_argument(
        "--max-rows", type=int, default=200, help="rows a table shows (>= 1, default 200)"
    )
    q.set_defaults(func=cmd_sql)

    v = sub.add_parser(
        "dev",
        help="dagster dev with the persistent DAGSTER_HOME; every option goes to dagster dev "
        "(e.g. deconflow dev --port 3001 --host 0.0.0.0)",
        description="Start `dagster dev` on deconflow's code and persistent instance "
        "(DAGSTER_HOME=$DECONFLOW_DATA/dagster_home). Everything after `dev`, -h included, "
        "goes to dagster dev.",
    )
    v.add_argument(
        "dagster_args", nargs=argparse.REMAINDER, help="options passed to dagster dev as they are"
    )
    v.set_defaults(func=cmd_dev)

    _service_parser(
        sub,
        "slurm",
        "the local one-node SLURM cluster: up | down | status | env",
        "Start, stop or inspect the local one-node SLURM cluster (development and tests); "
        "`env` prints the variables that point sbatch/squeue at it.",
        "options of the cluster tool, e.g. --dir DIR (see: deconflow slurm status -h)",
        cmd_slurm,
    )
    _service_parser(
        sub,
        "postgres",
        "a local PostgreSQL server for the Dagster instance: up | down | status | env",
        "Start, stop or inspect a local PostgreSQL server for the Dagster instance; `up` and "
        "`env` print the DECONFLOW_PG_URL to export.",
        "options of the server tool (see: deconflow postgres status -h)",
        cmd_postgres,
    )
    return p


def _one_line_errors() -> tuple[type[BaseException], ...]:
    """Errors shown as one line. DataError only once the training code is loaded (it
    raises it): importing it here would load torch for every command."""
    from deconflow.settings import SettingError
    from deconflow.slurm.script import SlurmConfigError

    errors: list[type[BaseException]] = [GridError, SlurmConfigError, SettingError]
    data = sys.modules.get("deconflow.training.data")
    if data is not None:
        errors.append(data.DataError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dev"]:  # everything after `dev` belongs to `dagster dev`, even -h/--help
        return cmd_dev(argparse.Namespace(dagster_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not isinstance(e, _one_line_errors()):
            raise
        print(f"deconflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deconflow: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``deconflow`` command: ``main``, then exit without the interpreter's teardown.

    Once a command has returned, everything it wrote is on disk (atomic writes, committed
    Dagster events, pool workers joined); what is left is garbage-collecting Dagster's
    module graph and its instance, about 0.7 s of every command's wall time. Output is
    flushed and logging shut down first."""
    import logging

    try:
        code = main()
    except SystemExit as e:  # argparse's --help/--version and usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
