"""Asset checks shown in the Dagster UI: completeness and the GO / NO-GO quality gates."""

import dagster as dg

from deconflow import warehouse
from deconflow.assets.tables import load_table
from deconflow.protocol import DIVERGED, FAILED, MATERIALIZED, MISSING, RUNNING
from deconflow.settings import db_path


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
    return dg.AssetCheckResult(
        passed=bool(done.all()),
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{int(done.sum())} of {len(df)} cells done",
        metadata={
            "done": int(done.sum()),
            "cells": len(df),
            "missing": len(missing),
            "failed": len(failed),
            "running": len(running),
            "missing_cells": ", ".join(missing[:50]) + (" ..." if len(missing) > 50 else ""),
            "failed_cells": "\n".join(f"{r.run_id}: {r.reason}" for r in failed.itertuples())
            or "none",
        },
    )


@dg.asset_check(
    asset="sweep_db",
    description="Quality gates of SPEC section 4: value ranges, "
    "no NaN outside diverged runs, knee epoch in [1, 20], logging frequencies.",
)
def quality_gates() -> dg.AssetCheckResult:
    gates = warehouse.quality_gates(db_path())
    go = bool(gates["passed"].all())
    return dg.AssetCheckResult(
        passed=go,
        description="GO" if go else "NO-GO",
        metadata={
            "verdict": "GO" if go else "NO-GO",
            "gates": dg.MetadataValue.md(gates.to_markdown(index=False)),
            **{
                g.gate: ("pass" if g.passed else f"FAIL ({g.violations})")
                for g in gates.itertuples()
            },
        },
    )
