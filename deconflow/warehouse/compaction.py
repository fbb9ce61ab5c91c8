"""Compaction of the warehouse store: per-cell Parquet parts merged into segments of
``segment_cells`` cells, so readers open a few hundred files, not one per cell."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from deconflow.protocol import FAMILIES, family_file
from deconflow.warehouse.store import (
    family_select,
    live_units_of,
    sql_str,
    unit_order,
)

# --- compaction ---------------------------------------------------------------------------


def merge(store: Path, manifest: dict, sources: list[str], con) -> str:
    """Merge the live rows of ``sources`` into one new segment unit; returns its id."""
    seg = f"s{manifest['seq'] + 1}-{uuid.uuid4().hex[:6]}"
    rel = Path("parts") / "segments" / seg
    tmp = store / "tmp" / f"segment-{seg}"
    tmp.mkdir(parents=True)
    live_map = live_units_of(manifest)
    members = {}
    for uid in sources:
        for k in live_map.get(uid, []):
            members[k] = manifest["cells"][k]["sig"]
    files = {}
    for family in FAMILIES:
        select = family_select(store, manifest, family, sources, live_map)
        if select is None:
            continue
        con.execute(
            f"COPY ({select} ORDER BY run_id, step) TO {sql_str(tmp / family_file(family))} "
            "(FORMAT parquet, ROW_GROUP_SIZE 65536)"
        )
        files[family] = str(rel / family_file(family))
    (store / rel).parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, store / rel)
    manifest["units"][seg] = {
        "kind": "segment",
        "files": files,
        "members": members,
        "created": manifest["seq"] + 1,
        "dir": str(rel),
    }
    for k in members:
        manifest["cells"][k]["unit"] = seg
    return seg


def next_job(manifest: dict, segment_cells: int) -> list[str] | None:
    """The next merge: the oldest ``segment_cells`` loose cells, else the segment holding
    the most superseded cells (rewritten with its current cells only), else nothing."""
    order = unit_order(manifest)
    live_map = live_units_of(manifest)
    loose = [u for u in order if manifest["units"][u]["kind"] == "cell" and live_map.get(u)]
    if len(loose) >= segment_cells:
        return loose[:segment_cells]
    dirty = []
    for u in order:
        unit = manifest["units"][u]
        live = len(live_map.get(u, []))
        if unit["kind"] == "segment" and 0 < live < len(unit["members"]):
            dirty.append((live - len(unit["members"]), u))
    return [min(dirty)[1]] if dirty else None


def compact(store: Path, manifest: dict, con, segment_cells: int, budget_s: float | None) -> int:
    """Merge until nothing is left to merge or ``budget_s`` is spent; returns cells merged.
    Each merge costs at most ``segment_cells`` cells of rows, never the sweep's size."""
    t0 = time.perf_counter()
    merged = 0
    while budget_s is None or time.perf_counter() - t0 < budget_s:
        job = next_job(manifest, segment_cells)
        if job is None:
            break
        merge(store, manifest, job, con)
        merged += len(job)
        retire_dead_units(manifest)
    return merged


def retire_dead_units(manifest: dict) -> bool:
    """Units with no current cell left go to the garbage list (deleted after retention)."""
    live_map = live_units_of(manifest)
    dead = [uid for uid in manifest["units"] if not live_map.get(uid)]
    for uid in dead:
        unit = manifest["units"].pop(uid)
        manifest["garbage"].append({"dir": unit["dir"], "at": time.time()})
    return bool(dead)
