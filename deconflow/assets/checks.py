"""Asset checks shown in the Dagster UI: completeness, the GO / NO-GO quality gates (naming
the runs that fail them) and whether the analysis is behind the landed cells."""

import re
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:  # heavy libraries load in asset bodies, not in every run worker
    import pandas as pd

from deconflow.assets import freshness
from deconflow.assets.tables import load_table, table_value
from deconflow.protocol import DIVERGED, FAILED, MATERIALIZED, MISSING, RUNNING
from deconflow.settings import db_path
from deconflow.sweep import Grid


@dg.asset_check(
    asset="completeness",
    description="Every cell of the grid is materialized "
    "(diverged counts: it is a result); names the missing and failed cells.",
)
def all_cells_materialized() -> dg.AssetCheckResult:
    df = load_table("completeness")
    done = df["status"].isin([MATERIALIZED, DIVERGED])
    missing = df.loc[df["status"] == MISSING, "run_id"].tolist()
    failed = df.loc[df["status"] == FAILED]
    running = df.loc[df["status"] == RUNNING, "run_id"].tolist()
    meta = {
        "done": int(done.sum()),
        "cells": len(df),
        "missing": len(missing),
        "failed": len(failed),
        "running": len(running),
        "missing_cells": ", ".join(missing[:50]) + (" ..." if len(missing) > 50 else ""),
        "failed_cells": "\n".join(f"{r.run_id}: {r.reason}" for r in failed.itertuples()) or "none",
    }
    if len(failed):
        meta["failed_table"] = table_value(failed[["run_id", "status", "reason"]])
    return dg.AssetCheckResult(
        passed=bool(done.all()),
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{int(done.sum())} of {len(df)} cells done"
        + (f"; failed: {', '.join(failed['run_id'].head(5))}" if len(failed) else ""),
        metadata=meta,
    )


# A cell key inside free text (the gates' detail): variant__lr<x>_wd<y>_s<seed>.
_CELL_KEY = re.compile(r"\b[A-Za-z0-9][A-Za-z0-9_.-]*__lr[0-9.e+-]+_wd[0-9.e+-]+_s\d+\b")


def _runs_of(row) -> list[str]:
    """The runs a gate names: its ``runs`` column when the gates provide one, else the cell
    keys its detail text mentions."""
    import pandas as pd

    runs = getattr(row, "runs", None)
    if runs is None or runs is pd.NA or (isinstance(runs, float) and runs != runs):
        return sorted(set(_CELL_KEY.findall(str(getattr(row, "detail", "") or ""))))
    if isinstance(runs, str):
        return [r.strip() for r in runs.split(",") if r.strip()]
    try:
        return [str(r) for r in list(runs)]
    except TypeError:
        return []


def gates_verdict(gates: "pd.DataFrame", variants=()) -> tuple[bool, str, dict]:
    """(go, description, metadata) of a gates table. The description names the arms
    (variants) that fail and, per failing gate, its runs; the metadata carries the gates
    and their per-variant breakdown (`gates_by_variant`) as Dagster tables."""
    from deconflow.warehouse.gates import failing_arms, gates_by_variant

    go = bool(gates["passed"].all()) if len(gates) else True
    failing = []
    for g in gates.itertuples():
        if bool(g.passed):
            continue
        runs = _runs_of(g)
        shown = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
        failing.append(
            f"{g.gate}: {int(g.violations)} violation(s)" + (f" in {shown}" if runs else "")
        )
    table = gates.copy()
    if "runs" in table.columns:
        table["runs"] = [", ".join(_runs_of(r)) for r in gates.itertuples()]
    by_variant = gates_by_variant(table, variants) if "runs" in table.columns else None
    arms = failing_arms(by_variant) if by_variant is not None else {}
    meta = {
        "verdict": "GO" if go else "NO-GO",
        "gates": table_value(table),
        **{
            str(g.gate): (
                f"FAIL ({int(g.violations)})"
                if not bool(g.passed)
                else f"WARN ({int(g.violations)})"
                if int(g.violations)
                else "pass"
            )
            for g in gates.itertuples()
        },
    }
    if by_variant is not None:
        meta["gates_by_variant"] = table_value(by_variant)
        verdicts = by_variant.groupby("variant")["verdict"].apply(
            lambda v: "NO-GO" if (v == "NO-GO").any() else "GO"
        )
        meta["arms"] = ", ".join(f"{v}: {x}" for v, x in verdicts.items())
    failing_runs = sorted(
        {r for g in gates.itertuples() if not bool(g.passed) for r in _runs_of(g)}
    )
    if failing_runs:
        meta["failing_runs"] = ", ".join(failing_runs[:100]) + (
            " ..." if len(failing_runs) > 100 else ""
        )
    arms_text = "; ".join(f"{v} ({', '.join(gs)})" for v, gs in arms.items())
    description = (
        "GO"
        if go
        else "NO-GO" + (f" in arms {arms_text}" if arms else "") + ". Gates: " + "; ".join(failing)
    )
    return go, description, meta


@dg.asset_check(
    asset="sweep_db",
    description="Quality gates of SPEC section 4: value ranges, "
    "no NaN outside diverged runs, validation blow-ups, knee epoch in [1, 20], logging "
    "frequencies; per variant (arm): the verdict names the failing arms and runs.",
)
def quality_gates() -> dg.AssetCheckResult:
    from deconflow.warehouse import gates as gates_mod
    from deconflow.warehouse.database import snapshot_path

    snap = snapshot_path(db_path())
    gates = gates_mod.quality_gates(snap)
    go, description, meta = gates_verdict(gates, gates_mod.sweep_variants(snap))
    return dg.AssetCheckResult(passed=go, description=description, metadata=meta)


def build_fresh_check(grid: Grid) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset="sweep_db",
        name=freshness.FRESH_CHECK,
        description="Warns when cells landed (or training runs failed) after the published "
        "analysis: Dagster's own staleness stops past 100 upstream partitions. Evaluated "
        "with every analysis and by the `analysis_refresh` sensor between analyses.",
    )
    def analysis_fresh(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        f = freshness.freshness(context.instance, grid.name)
        return dg.AssetCheckResult(
            passed=f["passed"],
            severity=dg.AssetCheckSeverity.WARN,
            description=f["description"],
            metadata=f["metadata"],
        )

    return analysis_fresh
