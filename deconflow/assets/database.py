"""``sweep_db`` publishes the tables into the DuckDB file users query; ``export`` writes the
dataset for the next stage of the research; ``sweep_report`` the one-page HTML report."""

import time

import dagster as dg

from deconflow.assets import freshness
from deconflow.assets.tables import load_table, table_value
from deconflow.settings import db_path, export_dir, runs_dir
from deconflow.sweep import Grid

TABLES = ["runs", "run_settings", "run_fits", "hypotheses", "hypotheses_excluded", "completeness"]


def build_database_assets(grid: Grid) -> list[dg.AssetsDefinition]:
    n_cells = len(grid)
    keys = frozenset(c.key for c in grid.cells)

    @dg.asset(
        deps=["runs", "run_fits", "hypotheses", "completeness"],
        group_name="warehouse",
        kinds={"duckdb"},
        pool="duckdb",
        description="The DuckDB file users query (default `data/deconflow.duckdb`, open it "
        "read-only). Metric families are views over the published Parquet, the analysis "
        "tables real tables; each publication is a new small file renamed into place, so "
        "publishing costs what landed since, and readers never meet a lock or a half-written "
        "table. The `analysis_fresh` check says whether cells landed since.",
    )
    def sweep_db(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from deconflow.warehouse.database import WarehouseError, publish_database, scan_published

        state = freshness.landings(context.instance, grid.name)
        t0 = time.monotonic()
        published = scan_published(runs_dir(), keys)  # one directory scan at any sweep size
        info = {
            "newest_landing_event_id": state.event_id,
            "newest_landing_cell": state.cell,
        }
        try:
            report = publish_database(
                db_path(),
                published,
                {name: load_table(name) for name in TABLES},
                info,
                log=context.log.warning,
            )
        except WarehouseError as e:
            raise dg.Failure(description=str(e)) from None
        secs = time.monotonic() - t0
        counts = report["counts"]
        context.log.info(
            f"published {db_path()} (snapshot {report['seq']}) in {secs:.2f}s: "
            f"{len(report['new'])} new, {len(report['changed'])} re-run, "
            f"{len(report['removed'])} removed cells; timings {report['timings']}"
        )
        return dg.MaterializeResult(
            metadata={
                **freshness.coverage_metadata(state, len(published), n_cells),
                "path": dg.MetadataValue.path(str(db_path())),
                "open_with": dg.MetadataValue.md(
                    f"`cd {db_path().parent} && duckdb -readonly {db_path().name}` or "
                    '`deconflow sql "SELECT ..."`'
                ),
                "snapshot": report["seq"],
                "publish_seconds": round(secs, 3),
                "cells_new": len(report["new"]),
                "cells_rerun": len(report["changed"]),
                "cells_removed": len(report["removed"]),
                "parquet_files": report["files"],
                "tables": table_value(_counts_frame(counts), max_rows=len(counts)),
                **{f"rows_{k}": v for k, v in counts.items()},
                **(
                    {"kept_user_changes": ", ".join(report["preserved"])}
                    if report["preserved"]
                    else {}
                ),
            }
        )

    @dg.asset(
        deps=[sweep_db],
        group_name="warehouse",
        kinds={"csv", "parquet"},
        description="Tier-4 export under `data/export/`: run_fits.csv (no scientific "
        "notation), metadata.json (rows, date, columns and types), "
        "`timeseries/<cell key>.parquet`.",
    )
    def export(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from deconflow.warehouse import export as export_mod
        from deconflow.warehouse import publish as publish_mod

        state = freshness.landings(context.instance, grid.name)
        published = publish_mod.published_runs(runs_dir(), grid)
        meta = export_mod.export_dataset(load_table("run_fits"), published, export_dir())
        return dg.MaterializeResult(
            metadata={
                **freshness.coverage_metadata(state, len(published), n_cells),
                "folder": dg.MetadataValue.path(str(export_dir())),
                "rows": meta["row_count"],
                "timeseries_files": len(published),
                "timeseries_rewritten": meta["timeseries"]["rewritten_this_refresh"],
            }
        )

    @dg.asset(
        deps=["run_fits", "hypotheses", "completeness", sweep_db],
        group_name="analysis",
        kinds={"html"},
        description="One self-contained, interactive HTML page (`data/report/index.html`, "
        "works offline): primary verdicts with CIs, quality gates per variant naming their "
        "runs, completeness, seed mean +/- band curves per cell, H2 within variant, "
        "hyper-parameters vs outcome, failures and exclusions, a sortable and filterable run "
        "table; hover names a run, click shows its curves, fit and knee. Open the `url` or "
        "`path` in its materialization.",
    )
    def sweep_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from deconflow.report import report_dir
        from deconflow.report.build import build_from_tables
        from deconflow.report.data import ReportInputError

        state = freshness.landings(context.instance, grid.name)
        out = report_dir() / "index.html"
        try:
            info = build_from_tables(out, grid, state=state, log=context.log.info)
        except ReportInputError as e:
            raise dg.Failure(description=f"sweep report not built: {e}") from None
        return dg.MaterializeResult(
            metadata={
                **info["coverage"],
                "url": dg.MetadataValue.url(out.resolve().as_uri()),
                "path": dg.MetadataValue.path(str(out.resolve())),
                "runs": info["runs"],
                "size_kb": round(info["bytes"] / 1024, 1),
                "build_seconds": info["total_s"],
                "gates_seconds": info["gates_s"],
            }
        )

    return [sweep_db, export, sweep_report]


def _counts_frame(counts: dict):
    import pandas as pd

    return pd.DataFrame({"table": list(counts), "rows": [int(v) for v in counts.values()]})
