"""The one Definitions object: ``dagster dev`` loads it from the repo root."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg

from deconflow import settings
from deconflow.assets.automation import build_refresh_sensor
from deconflow.assets.checks import all_cells_materialized, build_fresh_check, quality_gates
from deconflow.assets.database import build_database_assets
from deconflow.assets.tables import build_table_assets
from deconflow.assets.training import build_training_run
from deconflow.protocol import ANALYSIS_JOB, ANALYSIS_KIND, KIND_TAG, TRAINING_JOB
from deconflow.resources import compute_from_env, sweep_from_env
from deconflow.sensors import AlertWebhook, build_watchdog_sensor
from deconflow.sweep import Grid, load_grid

PACKAGE = Path(__file__).resolve().parent
DEFAULT_OWNERS = "team:deconflow"


def training_code_version() -> str:
    """Hash of the training code (``deconflow/training/*.py``, ``profiles.py``,
    ``schedule.py``): a change marks every ``training_run`` partition as changed in the UI.
    Read as bytes: nothing of torch is imported here."""
    h = hashlib.sha256()
    for p in sorted((PACKAGE / "training").glob("*.py")) + [
        PACKAGE / "profiles.py",
        PACKAGE / "schedule.py",
    ]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def owners() -> list[str]:
    """``DECONFLOW_OWNERS`` (comma-separated e-mails or ``team:<name>``), default the team."""
    raw = settings.get("DECONFLOW_OWNERS") or DEFAULT_OWNERS
    return [o.strip() for o in raw.split(",") if o.strip()]


def build_definitions(grid: Grid | None = None, resources: dict | None = None) -> dg.Definitions:
    grid = grid or load_grid()
    training_run = build_training_run(grid).map_asset_specs(
        lambda spec: spec.replace_attributes(code_version=training_code_version())
    )
    assets = [training_run, *build_table_assets(grid), *build_database_assets(grid)]
    who = owners()
    assets = [a.map_asset_specs(lambda spec: spec.replace_attributes(owners=who)) for a in assets]
    analysis = dg.AssetSelection.all() - dg.AssetSelection.assets(training_run)
    return dg.Definitions(
        assets=assets,
        asset_checks=[all_cells_materialized, quality_gates, build_fresh_check(grid)],
        jobs=[
            dg.define_asset_job(
                TRAINING_JOB,
                selection=[training_run],
                description="Train the selected partitions (backfills).",
            ),
            dg.define_asset_job(
                ANALYSIS_JOB,
                selection=analysis,
                tags={KIND_TAG: ANALYSIS_KIND},
                # One process for the whole analysis: a process per step would cost more
                # start-up (imports) than the steps themselves take.
                executor_def=dg.in_process_executor,
                description="Recompute the tables, publish DuckDB, export, report. Launched "
                "by the analysis_refresh sensor when cells land; also by hand.",
            ),
        ],
        sensors=[build_watchdog_sensor(grid), build_refresh_sensor(grid)],
        # Every run is one process on the orchestrator host (no step subprocess): a training
        # run only waits on its job, and 128 of them must fit a login node (issue 11).
        executor=dg.in_process_executor,
        resources={
            "alerts": AlertWebhook(),
            **(resources or {"compute": compute_from_env(), "sweep": sweep_from_env()}),
        },
    )


defs = build_definitions()
