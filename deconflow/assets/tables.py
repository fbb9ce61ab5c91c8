"""Sweep-level tables computed from the published runs (thin: the logic is in
``deconflow.warehouse`` and ``deconflow.analysis``). Each lands as Parquet under
``data/tables/`` and is published into DuckDB by ``sweep_db``."""

import dagster as dg
import pandas as pd

from deconflow import warehouse
from deconflow.analysis.hypotheses import hypotheses_table
from deconflow.assets import plots
from deconflow.dagster_state import partition_states
from deconflow.parquet_io import write_parquet
from deconflow.settings import runs_dir, tables_dir
from deconflow.sweep import Grid


def save_table(name: str, df: pd.DataFrame) -> None:
    write_parquet(tables_dir() / f"{name}.parquet", df)


def load_table(name: str) -> pd.DataFrame:
    path = tables_dir() / f"{name}.parquet"
    if not path.exists():
        raise dg.Failure(f"table {name} has not been computed yet ({path} is missing)")
    return pd.read_parquet(path)


def _preview(df: pd.DataFrame, n: int = 20) -> dg.MetadataValue:
    return dg.MetadataValue.md(df.head(n).to_markdown(index=False, floatfmt=".4g"))


def build_table_assets(grid: Grid) -> list[dg.AssetsDefinition]:
    n_cells = len(grid)

    @dg.asset(
        deps=["training_run"],
        group_name="analysis",
        kinds={"pandas"},
        description="One row per grid cell: identity, Dagster status, outcome, attempts, "
        "wall time, SLURM job id, failure class (the `runs` table).",
    )
    def runs(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        published = warehouse.published_runs(runs_dir(), grid)
        states = partition_states(context.instance, grid.name)
        df = warehouse.runs_table(grid, published, states)
        save_table("runs", df)
        save_table("run_settings", warehouse.run_settings(published))
        counts = df["status"].value_counts().to_dict()
        return dg.MaterializeResult(
            metadata={
                "cells": n_cells,
                "published_runs": len(published),
                **{f"status_{k}": int(v) for k, v in counts.items()},
            }
        )

    @dg.asset(
        deps=["training_run"],
        group_name="analysis",
        kinds={"pandas"},
        description="Per run: power-law fit (R², exponent), burn-in knee, alpha_early, "
        "alpha_full, best validation CE and epoch (the `run_fits` table).",
    )
    def run_fits() -> dg.MaterializeResult:
        published = warehouse.published_runs(runs_dir(), grid)
        fits = warehouse.run_fits(published)
        save_table("run_fits", fits)
        meta = {
            "runs": len(fits),
            "coverage": f"{len(fits)} of {n_cells} cells",
            "median_r_squared": float(fits["r_squared"].median()) if len(fits) else None,
            "preview": _preview(fits),
        }
        if len(fits):
            meta["loss_curves"] = plots.loss_curves(published, fits)
            meta["r_squared_histogram"] = plots.r2_histogram(fits)
        return dg.MaterializeResult(metadata={k: v for k, v in meta.items() if v is not None})

    @dg.asset(
        deps=[run_fits],
        group_name="analysis",
        kinds={"pandas"},
        description="H1 (power-law prevalence) and H2 (early slope predicts best val CE), "
        "pooled and per variant, Pearson and Spearman with bootstrap 95% CIs, n used and "
        "excluded runs with reasons (tables `hypotheses`, `hypotheses_excluded`).",
    )
    def hypotheses() -> dg.MaterializeResult:
        fits = load_table("run_fits")
        results, excluded = hypotheses_table(fits)
        save_table("hypotheses", results)
        save_table("hypotheses_excluded", excluded)
        pooled = results[results["scope"] == "pooled"]
        meta = {
            "coverage": f"{len(fits)} of {n_cells} cells",
            "excluded_runs": len(excluded),
            "results": _preview(results, 40),
        }
        for r in pooled.itertuples():
            meta[f"{r.hypothesis}_{r.method}".replace(" ", "_")] = (
                f"{r.value:.3f} (n={r.n}, {'pass' if r.passed else 'fail'})"
            )
        if len(fits):
            meta["alpha_vs_best_val"] = plots.alpha_scatter(fits)
        return dg.MaterializeResult(metadata=meta)

    @dg.asset(
        deps=[runs],
        group_name="analysis",
        kinds={"pandas"},
        description="For each grid cell: materialized, running, failed (and why), diverged "
        "or missing (the `completeness` table).",
    )
    def completeness() -> dg.MaterializeResult:
        df = warehouse.completeness(load_table("runs"))
        save_table("completeness", df)
        counts = df["status"].value_counts().to_dict()
        return dg.MaterializeResult(
            metadata={"cells": n_cells, **{k: int(v) for k, v in counts.items()}}
        )

    return [runs, run_fits, hypotheses, completeness]
