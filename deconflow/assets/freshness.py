"""Which landed cells an analysis covers, and whether it is behind.

Dagster's own staleness does not reach the analysis (it stops looking past 100 upstream
partitions; ``training_run`` has 216 or more), so deconflow tracks it itself:

- every analysis materialization records the landings it covers: the newest
  ``training_run`` materialization it saw (event id, time, cell), the newest failed training
  run, and the number of published cells it read;
- the ``analysis_fresh`` check on ``sweep_db`` compares that with the instance now and warns,
  naming the cells that landed since. It runs with every analysis and is re-evaluated by the
  ``analysis_refresh`` sensor between analysis runs, so the UI shows when analysis is behind.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import dagster as dg

from deconflow.keys import cell_of_partition
from deconflow.protocol import (
    CELL_TAG,
    ENDED_BADLY_STATUSES,
    PARTITION_TAG,
    SWEEP_DB_ASSET,
    SWEEP_TAG,
    TRAINING_ASSET,
)

TRAINING = dg.AssetKey(TRAINING_ASSET)
SWEEP_DB = dg.AssetKey(SWEEP_DB_ASSET)
FRESH_CHECK = "analysis_fresh"
_ENDED_BADLY = [dg.DagsterRunStatus(s) for s in sorted(ENDED_BADLY_STATUSES)]

# Metadata keys an analysis materialization carries (read back by the check and sensor).
EVENT_KEY = "newest_landing_event_id"
FAILURE_KEY = "newest_failure_ts"


@dataclass(frozen=True)
class Landings:
    """The newest landing and the newest failure of the sweep's training partitions."""

    event_id: int | None = None  # storage id of the newest training_run materialization
    at: float | None = None
    cell: str | None = None
    failure_at: float | None = None  # end of the newest failed or canceled training run
    failure_cell: str | None = None

    def signal(self) -> list:
        """What changes when a cell lands or fails (JSON-able)."""
        return [self.event_id, self.failure_at]

    def as_dict(self) -> dict:
        return asdict(self)


def _cell(partition: str | None) -> str | None:
    if not partition:
        return None
    try:
        return cell_of_partition(partition).key
    except ValueError:
        return partition


def landings(instance: dg.DagsterInstance, sweep: str) -> Landings:
    """Two indexed queries: the newest materialization and the newest bad end."""
    mats = instance.fetch_materializations(TRAINING, limit=1).records
    fails = instance.get_run_records(
        dg.RunsFilter(tags={SWEEP_TAG: sweep}, statuses=_ENDED_BADLY),
        limit=1,
        order_by="update_timestamp",
        ascending=False,
    )
    m = mats[0] if mats else None
    f = fails[0] if fails else None
    return Landings(
        event_id=m.storage_id if m else None,
        at=m.timestamp if m else None,
        cell=_cell(m.partition_key) if m else None,
        failure_at=(f.update_timestamp.timestamp() if f and f.update_timestamp else None),
        failure_cell=(
            _cell(f.dagster_run.tags.get(PARTITION_TAG)) or f.dagster_run.tags.get(CELL_TAG)
            if f
            else None
        ),
    )


def _ts(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def coverage_metadata(state: Landings, covered_cells: int, n_cells: int) -> dict:
    """Metadata of an analysis materialization: what it covers."""
    meta: dict = {
        "covered_cells": covered_cells,
        "coverage": f"{covered_cells} of {n_cells} cells landed",
        EVENT_KEY: state.event_id if state.event_id is not None else -1,
    }
    if state.at is not None:
        meta["newest_landing"] = dg.MetadataValue.timestamp(state.at)
        meta["newest_landing_cell"] = state.cell or "-"
    if state.failure_at is not None:
        meta[FAILURE_KEY] = dg.MetadataValue.timestamp(state.failure_at)
        meta["newest_failure_cell"] = state.failure_cell or "-"
    return meta


def covered_by(instance: dg.DagsterInstance, asset: dg.AssetKey = SWEEP_DB) -> dict | None:
    """What the latest materialization of ``asset`` covers: event id, failure ts, time."""
    recs = instance.fetch_materializations(asset, limit=1).records
    if not recs:
        return None
    meta = recs[0].asset_materialization.metadata if recs[0].asset_materialization else {}

    def value(key):
        v = meta.get(key)
        return getattr(v, "value", v)

    event = value(EVENT_KEY)
    return {
        "event_id": None if event in (None, -1) else int(event),
        "failure_at": value(FAILURE_KEY),
        "at": recs[0].timestamp,
        "cells": value("covered_cells"),
    }


def freshness(instance: dg.DagsterInstance, sweep: str, state: Landings | None = None) -> dict:
    """passed, description and metadata of the ``analysis_fresh`` check, as of now."""
    state = state or landings(instance, sweep)
    cov = covered_by(instance)
    if cov is None:
        if state.event_id is None and state.failure_at is None:
            return {"passed": True, "description": "no cell has landed yet", "metadata": {}}
        return {
            "passed": False,
            "description": "behind: the DuckDB file has never been published",
            "metadata": {"newest_landing_cell": state.cell or "-"},
        }
    landed: list[str] = []
    if state.event_id is not None and (cov["event_id"] is None or state.event_id > cov["event_id"]):
        recs = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=TRAINING, after_storage_id=cov["event_id"] or 0),
            limit=1000,
        ).records
        landed = sorted({_cell(r.partition_key) or "?" for r in recs})
    failed = state.failure_at is not None and (
        cov["failure_at"] is None or state.failure_at > float(cov["failure_at"]) + 1e-6
    )
    meta = {
        "analysis_published": dg.MetadataValue.timestamp(cov["at"]),
        "covered_cells": cov["cells"] if cov["cells"] is not None else -1,
        "landed_since": len(landed),
        "cells_landed_since": ", ".join(landed[:50]) + (" ..." if len(landed) > 50 else "")
        or "none",
    }
    if state.at is not None:
        meta["newest_landing"] = dg.MetadataValue.timestamp(state.at)
        meta["newest_landing_cell"] = state.cell or "-"
    if not landed and not failed:
        return {
            "passed": True,
            "description": f"up to date: covers every landing up to {_ts(state.at)}",
            "metadata": meta,
        }
    parts = []
    if landed:
        parts.append(
            f"{len(landed)} cell(s) landed since the analysis (newest {state.cell} "
            f"at {_ts(state.at)})"
        )
    if failed:
        parts.append(
            f"a training run failed since ({state.failure_cell} at {_ts(state.failure_at)})"
        )
    return {"passed": False, "description": "behind: " + "; ".join(parts), "metadata": meta}


def fresh_evaluation(instance: dg.DagsterInstance, sweep: str, state: Landings | None = None):
    """The check's evaluation as an event (the sensor reports it between analysis runs)."""
    f = freshness(instance, sweep, state)
    return dg.AssetCheckEvaluation(
        asset_key=SWEEP_DB,
        check_name=FRESH_CHECK,
        passed=f["passed"],
        severity=dg.AssetCheckSeverity.WARN,
        description=f["description"],
        metadata=f["metadata"],
    )
