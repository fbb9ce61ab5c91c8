"""Sweep-level tables computed from the published runs (thin: the logic is in
``deconflow.warehouse`` and ``deconflow.analysis``). Each lands as Parquet under
``data/tables/`` and is published into DuckDB by ``sweep_db``.

Every materialization says which landed cells it covers (see :mod:`.freshness`), shows its
table as Dagster table metadata (column schema, row count, rows) and its pictures inline.
``run_fits`` refits only the cells that are new or re-run since its last materialization.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import dagster as dg

from deconflow.datadict import column_docs

if TYPE_CHECKING:  # heavy libraries load in asset bodies, not in every run worker
    import pandas as pd

from deconflow.assets import freshness
from deconflow.protocol import DIVERGED, MATERIALIZED, TRAINING_ASSET
from deconflow.run_index import partition_states
from deconflow.settings import runs_dir, tables_dir
from deconflow.sweep import Grid

TABLE_ROWS = 500  # rows shown in a table's metadata (the whole table is in DuckDB)

# Public column names: one meaning per name (README, data dictionary).
PUBLIC_NAMES = {"attempts": "dagster_runs"}


def public(df: "pd.DataFrame") -> "pd.DataFrame":
    """``attempts`` (Dagster runs of the cell) is published as ``dagster_runs``."""
    return df.rename(
        columns={k: v for k, v in PUBLIC_NAMES.items() if k in df.columns and v not in df.columns}
    )


def with_internal(df: "pd.DataFrame") -> "pd.DataFrame":
    """The public table plus the internal alias the warehouse functions read."""
    df = df.copy()
    for k, v in PUBLIC_NAMES.items():
        if v in df.columns and k not in df.columns:
            df[k] = df[v]
    return df


class HypothesesConfig(dg.Config):
    """Declared analysis settings of the `hypotheses` asset (Launchpad: ops.hypotheses.config)."""

    # The R² H1's primary row counts. "shape" (pre-declared: R² over the run's
    # noise-limited R² estimate, testing the power-law shape, not the batch noise); "raw"
    # (the plan's literal rule) and "epoch_mean" are kept as exploratory rows.
    h1_smoothing: Literal["shape", "raw", "epoch_mean"] = "shape"


def save_table(name: str, df: "pd.DataFrame") -> None:
    from deconflow.parquet_io import write_parquet

    write_parquet(tables_dir() / f"{name}.parquet", df)


def load_table(name: str) -> "pd.DataFrame":
    import pandas as pd

    path = tables_dir() / f"{name}.parquet"
    if not path.exists():
        raise dg.Failure(f"table {name} has not been computed yet ({path} is missing)")
    return pd.read_parquet(path)


# --- table metadata -----------------------------------------------------------------------


def _column_type(dtype) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    return "string"


def _cell_value(v):
    import pandas as pd

    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, float):
        return None if not math.isfinite(v) else float(f"{v:.6g}")
    if hasattr(v, "item"):  # numpy scalars
        return _cell_value(v.item())
    if isinstance(v, bool | int | str):
        return v
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v))
    return str(v)


def table_schema(df: "pd.DataFrame", descriptions: dict[str, str] | None = None) -> dg.TableSchema:
    descriptions = descriptions or {}
    return dg.TableSchema(
        columns=[
            dg.TableColumn(str(c), _column_type(t), description=descriptions.get(str(c)))
            for c, t in df.dtypes.items()
        ]
    )


def table_value(df: "pd.DataFrame", max_rows: int = TABLE_ROWS) -> dg.MetadataValue:
    """A Dagster table (rendered as a real table in the UI) of the first ``max_rows`` rows."""
    records = [
        dg.TableRecord({str(k): _cell_value(v) for k, v in row.items()})
        for row in df.head(max_rows).to_dict("records")
    ]
    return dg.MetadataValue.table(records=records, schema=table_schema(df))


def table_metadata(df: "pd.DataFrame", name: str, max_rows: int = TABLE_ROWS) -> dict:
    """Row count, column schema and the rows, under Dagster's standard keys."""
    shown = min(len(df), max_rows)
    return {
        "dagster/row_count": len(df),
        "dagster/column_schema": table_schema(df, column_docs(name)),  # the data dictionary
        name: table_value(df, max_rows),
        "rows_shown": f"{shown} of {len(df)}" + ("" if shown == len(df) else " (all in DuckDB)"),
    }


# --- incremental fits ---------------------------------------------------------------------


def _analysis_version() -> str:
    """Changes when the fit code changes: cached fits are then recomputed."""
    import deconflow.analysis as analysis
    import deconflow.warehouse.tables as wt
    from deconflow.warehouse import tables as tables_mod

    h = hashlib.sha1()
    for p in sorted(Path(analysis.__file__).parent.glob("*.py")) + [Path(wt.__file__)]:
        h.update(p.read_bytes())
    h.update(json.dumps(list(tables_mod.FIT_COLUMNS)).encode())
    return h.hexdigest()[:16]


def incremental_fits(published: dict[str, Path]) -> "tuple[pd.DataFrame, dict, int]":
    """run_fits for ``published``, refitting only new or re-run cells.

    Returns (table, cache to save once the table is saved, number of cells refitted)."""
    import pandas as pd

    from deconflow.warehouse import tables as tables_mod
    from deconflow.warehouse.database import cell_signature

    cache_path = tables_dir() / ".run_fits_cache.json"
    version = _analysis_version()
    sigs = {}
    for key, d in published.items():
        try:
            sigs[key] = cell_signature(d)[0]
        except FileNotFoundError:
            sigs[key] = None
    old_sigs: dict = {}
    old = None
    try:
        cache = json.loads(cache_path.read_text())
        if cache.get("version") == version and (tables_dir() / "run_fits.parquet").exists():
            old_sigs = cache["sigs"]
            old = pd.read_parquet(tables_dir() / "run_fits.parquet")
    except (FileNotFoundError, json.JSONDecodeError, KeyError, OSError):
        pass
    keep = {k for k, s in sigs.items() if s is not None and old_sigs.get(k) == s}
    if old is not None and "run_id" in old.columns:
        keep &= set(old["run_id"])
    todo = {k: d for k, d in published.items() if k not in keep}
    fresh = tables_mod.run_fits(todo) if todo else None
    parts = []
    if keep and old is not None:
        parts.append(old[old["run_id"].isin(keep)])
    if fresh is not None:
        parts.append(fresh)
    if parts:
        fits = pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True)
        order = {k: i for i, k in enumerate(published)}
        fits = fits.sort_values("run_id", key=lambda s: s.map(order)).reset_index(drop=True)
    else:
        fits = tables_mod.run_fits({})
    return fits, {"version": version, "sigs": {k: sigs[k] for k in keep | set(todo)}}, len(todo)


def _save_fits_cache(cache: dict) -> None:
    from deconflow.atomic import atomic_write_json

    atomic_write_json(tables_dir() / ".run_fits_cache.json", cache)


# --- the assets ---------------------------------------------------------------------------


def build_table_assets(grid: Grid) -> list[dg.AssetsDefinition]:
    n_cells = len(grid)

    @dg.asset(
        deps=[TRAINING_ASSET],
        group_name="analysis",
        kinds={"pandas"},
        description="One row per grid cell: identity, Dagster status, outcome, `dagster_runs` "
        "(Dagster runs of the cell), `resumes` (checkpoint resumes inside the published run), "
        "wall time, SLURM job id, failure class (the `runs` table).",
    )
    def runs(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from deconflow.warehouse import publish as publish_mod
        from deconflow.warehouse import tables as tables_mod

        state = freshness.landings(context.instance, grid.name)  # before reading the folders
        published = publish_mod.published_runs(runs_dir(), grid)
        states = partition_states(context.instance, grid.name)
        df = public(tables_mod.runs_table(grid, published, states))
        save_table("runs", df)
        save_table("run_settings", tables_mod.run_settings(published))
        counts = df["status"].value_counts().to_dict()
        return dg.MaterializeResult(
            metadata={
                **freshness.coverage_metadata(state, len(published), n_cells),
                **{f"status_{k}": int(v) for k, v in counts.items()},
                **table_metadata(df, "runs"),
            }
        )

    @dg.asset(
        deps=[TRAINING_ASSET],
        group_name="analysis",
        kinds={"pandas"},
        description="Per run: power-law fit (R², noise-limited R², shape R², exponent), "
        "smoothed burn-in knee, alpha_early, alpha_full, best validation CE and epoch (the "
        "`run_fits` table). Only new or re-run cells are refitted. Its pictures are the "
        "`run_fit_figures` asset, so they never hold up the tables.",
    )
    def run_fits(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        import pandas as pd

        from deconflow.warehouse import publish as publish_mod

        state = freshness.landings(context.instance, grid.name)
        published = publish_mod.published_runs(runs_dir(), grid)
        fits, cache, refitted = incremental_fits(published)
        save_table("run_fits", fits)
        _save_fits_cache(cache)
        meta = {
            **freshness.coverage_metadata(state, len(published), n_cells),
            "refitted_runs": refitted,
            **table_metadata(fits, "run_fits"),
        }
        for column in ("r_squared", "r_squared_shape"):
            r2 = pd.to_numeric(fits[column], errors="coerce").astype("float64")
            if r2.notna().any():
                meta[f"median_{column}"] = float(r2.median())
        dropped = pd.to_numeric(fits["n_dropped_nonfinite"], errors="coerce").fillna(0)
        meta["dropped_nonfinite_rows"] = int(dropped.sum())
        return dg.MaterializeResult(metadata=meta)

    @dg.asset(
        deps=[run_fits],
        group_name="analysis",
        kinds={"matplotlib"},
        description="Pictures of `run_fits`: the loss curves with their fits, one per "
        "variant, and the R² histogram (raw and shape R²). Their own asset: matplotlib "
        "takes seconds per picture, the tables do not wait for it.",
    )
    def run_fit_figures(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from deconflow.report import save_figure
        from deconflow.warehouse import publish as publish_mod

        state = freshness.landings(context.instance, grid.name)
        fits = load_table("run_fits")
        published = publish_mod.published_runs(runs_dir(), grid)
        meta: dict = {
            **freshness.coverage_metadata(state, len(published), n_cells),
            "runs": len(fits),
        }
        if len(fits):
            from deconflow.assets import plots

            for variant in sorted(fits["variant"].unique()):
                data = plots.loss_curves_variant(
                    variant, fits, published, sorted(grid.lrs), sorted(grid.weight_decays)
                )
                save_figure(f"loss_curves_{variant}", data)
                meta[f"loss_curves_{variant}"] = plots.md_image(data, f"loss curves {variant}")
            data = plots.r2_histogram(fits)
            save_figure("r_squared_histogram", data)
            meta["r_squared_histogram"] = plots.md_image(data, "R² histogram")
        return dg.MaterializeResult(metadata=meta)

    @dg.asset(
        deps=[run_fits],
        group_name="analysis",
        kinds={"pandas"},
        description="H1 (power-law prevalence) and H2 (early slope predicts best val CE): "
        "one pre-declared primary row each with its verdict (PASS / FAIL / INCONCLUSIVE), "
        "per-variant secondary rows (Holm-adjusted) and exploratory rows (tables "
        "`hypotheses`, `hypotheses_excluded`); the short verdict table is its metadata. "
        "Shows alpha_early vs best validation CE per variant.",
    )
    def hypotheses(
        context: dg.AssetExecutionContext, config: HypothesesConfig
    ) -> dg.MaterializeResult:
        from deconflow.analysis.hypotheses import hypotheses_table, verdict_table
        from deconflow.report import save_figure

        state = freshness.landings(context.instance, grid.name)
        fits = load_table("run_fits")
        results, excluded = hypotheses_table(fits, h1_rule=config.h1_smoothing)
        save_table("hypotheses", results)
        save_table("hypotheses_excluded", excluded)
        short = verdict_table(results)
        meta = {
            **freshness.coverage_metadata(state, len(fits), n_cells),
            "excluded_runs": len(excluded),
            "verdicts": table_value(short),
            **{
                f"{r.hypothesis}_verdict": f"{r.verdict} ({r.method}, {r.scope}, n={r.n})"
                for r in short[short["tier"] == "primary"].itertuples()
            },
            **table_metadata(results, "hypotheses"),
            "excluded": table_value(excluded),
        }
        if len(fits):
            from deconflow.assets import plots

            data = plots.alpha_scatter(fits)
            save_figure("alpha_vs_best_val", data)
            meta["alpha_vs_best_val"] = plots.md_image(data, "alpha_early vs best_val_ce")
        return dg.MaterializeResult(metadata=meta)

    @dg.asset(
        deps=[runs],
        group_name="analysis",
        kinds={"pandas"},
        description="For each grid cell: materialized, running, failed (and why), diverged "
        "or missing (the `completeness` table); a heat-map of variant x (lr, wd) x seed.",
    )
    def completeness(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from deconflow.assets import plots
        from deconflow.report import save_figure
        from deconflow.warehouse import tables as tables_mod

        state = freshness.landings(context.instance, grid.name)
        df = public(tables_mod.completeness(with_internal(load_table("runs"))))
        save_table("completeness", df)
        counts = df["status"].value_counts().to_dict()
        data = plots.completeness_heatmap(df)
        save_figure("completeness_heatmap", data)
        landed = int(df["status"].isin([MATERIALIZED, DIVERGED]).sum())
        return dg.MaterializeResult(
            metadata={
                **freshness.coverage_metadata(state, landed, n_cells),
                "cells": n_cells,
                **{k: int(v) for k, v in counts.items()},
                "heatmap": plots.md_image(data, "completeness heat-map"),
                **table_metadata(df, "completeness"),
            }
        )

    return [runs, run_fits, run_fit_figures, hypotheses, completeness]


__all__ = [
    "build_table_assets",
    "load_table",
    "public",
    "save_table",
    "table_metadata",
    "table_value",
]
