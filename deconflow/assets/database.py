"""``sweep_db`` publishes every table into one DuckDB file; ``export`` writes the
dataset for the next stage of the research."""

import time

import dagster as dg

from deconflow import warehouse
from deconflow.assets.tables import load_table
from deconflow.settings import db_path, export_dir, runs_dir
from deconflow.sweep import Grid

TABLES = ["runs", "run_settings", "run_fits", "hypotheses", "hypotheses_excluded", "completeness"]


def build_database_assets(grid: Grid) -> list[dg.AssetsDefinition]:
    @dg.asset(
        deps=["runs", "run_fits", "hypotheses", "completeness"],
        group_name="warehouse",
        kinds={"duckdb"},
        pool="duckdb",
        description="The DuckDB file users query (default data/deconflow.duckdb): metrics "
        "tables from the runs' Parquet plus the analysis tables. Built as a fresh file and "
        "renamed into place, so readers never meet a lock or a half-written database.",
    )
    def sweep_db(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        t0 = time.monotonic()
        published = warehouse.published_runs(runs_dir(), grid)
        counts = warehouse.build_database(
            db_path(), published, {name: load_table(name) for name in TABLES}
        )
        context.log.info(f"published {db_path()} in {time.monotonic() - t0:.1f}s: {counts}")
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(db_path())),
                **{f"rows_{k}": v for k, v in counts.items()},
            }
        )

    @dg.asset(
        deps=[sweep_db],
        group_name="warehouse",
        kinds={"csv", "parquet"},
        description="Tier-4 export under data/export/: run_fits.csv (no scientific "
        "notation), metadata.json (rows, date, columns and types), timeseries/<run>.parquet.",
    )
    def export() -> dg.MaterializeResult:
        published = warehouse.published_runs(runs_dir(), grid)
        meta = warehouse.export_dataset(load_table("run_fits"), published, export_dir())
        return dg.MaterializeResult(
            metadata={
                "folder": dg.MetadataValue.path(str(export_dir())),
                "rows": meta["row_count"],
                "timeseries_files": len(published),
            }
        )

    return [sweep_db, export]
