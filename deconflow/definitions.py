"""The one Definitions object: ``dagster dev`` loads it from the repo root."""

from __future__ import annotations

import dagster as dg

from deconflow.assets.checks import all_cells_materialized, quality_gates
from deconflow.assets.database import build_database_assets
from deconflow.assets.tables import build_table_assets
from deconflow.assets.training import build_training_run
from deconflow.resources import compute_from_env, sweep_from_env
from deconflow.sensors import AlertWebhook, build_watchdog_sensor
from deconflow.sweep import Grid, load_grid


def build_definitions(grid: Grid | None = None, resources: dict | None = None) -> dg.Definitions:
    grid = grid or load_grid()
    training_run = build_training_run(grid)
    assets = [training_run, *build_table_assets(grid), *build_database_assets(grid)]
    analysis = dg.AssetSelection.groups("analysis", "warehouse")
    return dg.Definitions(
        assets=assets,
        asset_checks=[all_cells_materialized, quality_gates],
        jobs=[
            dg.define_asset_job(
                "train_cells",
                selection=[training_run],
                description="Train the selected partitions (backfills).",
            ),
            dg.define_asset_job(
                "analyse_sweep",
                selection=analysis,
                description="Recompute the tables and publish DuckDB.",
            ),
        ],
        sensors=[build_watchdog_sensor(grid)],
        resources={
            "alerts": AlertWebhook(),
            **(resources or {"compute": compute_from_env(), "sweep": sweep_from_env()}),
        },
    )


defs = build_definitions()
