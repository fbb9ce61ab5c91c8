"""The DuckDB file users query, published by one writer at a cost that follows new data.

Layout, for the default ``data/deconflow.duckdb``::

    data/deconflow.duckdb         what users open (read-only, 0444 less the umask): a copy of the
                                  current snapshot, replaced whole (os.replace) by every publication
    data/deconflow.warehouse/
      CURRENT                     name of the current snapshot; deconflow's own readers open it
      snapshots/<seq>.duckdb      small DuckDB files: the analysis tables as real tables, the
                                  metric families as VIEWs over the Parquet parts below
      parts/cells/<key>/<sig>/    one landed cell: hard links to its published Parquet files
      parts/segments/<id>/        many cells merged into one file per family (compaction)
      manifest.json               which part holds each cell's current rows
      writer.lock                 flock: one writer at a time, released when its process dies
      tmp/                        a writer's temp files: removed on failure and by the next writer
      replaced/                   published files that a read-write session had changed, kept
                                  together with their WAL (so nothing a user wrote is lost)

Publishing one newly landed cell links its files (no copy), builds a snapshot of a few hundred
KB (tables of one row per cell plus views) and renames it into place: its cost does not grow
with the metric rows of the sweep. Loose cells are merged into segments of
``DECONFLOW_DB_SEGMENT_CELLS`` (32) after each publication, so a query opens a few hundred
files at 10,000 cells, not 40,000. Readers never meet a lock (they open immutable snapshots
read-only; a read-write session on ``deconflow.duckdb`` never touches a snapshot), a
half-written table (every file is renamed into place whole) or a missing file (a part that
no current cell uses stays ``DECONFLOW_DB_RETAIN_S``, default 6 h, for sessions still open on
an older publication).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd

from deconflow import datadict
from deconflow.atomic import atomic_write_bytes, current_umask
from deconflow.protocol import FAMILIES, SUMMARY
from deconflow.warehouse.compaction import compact, retire_dead_units
from deconflow.warehouse.store import (  # noqa: F401  (re-exported: the public API)
    DEFAULT_COMPACT_BUDGET_S,
    DEFAULT_RETAIN_S,
    DEFAULT_SEGMENT_CELLS,
    KEEP_REPLACED,
    KEEP_SNAPSHOTS,
    PUBLICATION_TABLE,
    SNAPSHOT_GRACE_S,
    DiskFullError,
    WarehouseError,
    WriterBusy,
    cell_signature,
    connect_readonly,
    connect_writable,
    disk_full_error,
    empty_select,
    env_number,
    family_cols,
    family_select,
    is_disk_full,
    live_units_of,
    load_manifest,
    make_cell_part,
    save_manifest,
    scan_published,
    set_search_path,
    snapshot_path,
    sql_str,
    store_dir,
    unit_order,
    writer_lock,
)

# --- the snapshot -------------------------------------------------------------------------


def _write_snapshot(
    store: Path, manifest: dict, tables: dict[str, pd.DataFrame], info: dict, path: Path
) -> dict[str, int]:
    uids = unit_order(manifest)
    live_map = live_units_of(manifest)
    counts: dict[str, int] = {}
    con = connect_writable(path)
    try:
        set_search_path(con, store.parent / "x.duckdb")  # binds the views' relative paths
        for family in FAMILIES:
            sql = family_select(store, manifest, family, uids, live_map, base=store.parent)
            sql = sql or empty_select(family)
            con.execute(f"CREATE VIEW {family} AS {sql}")
            counts[family] = sum(
                c.get("rows", {}).get(family, 0) for c in manifest["cells"].values()
            )
        for name, df in tables.items():
            con.register("_df", _typed(df))
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _df')
            con.unregister("_df")
            counts[name] = len(df)
        con.register("_df", _publication_frame(info))
        con.execute(f"CREATE TABLE {PUBLICATION_TABLE} AS SELECT * FROM _df")
        con.unregister("_df")
        _comment(con)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return counts


def _comment(con: duckdb.DuckDBPyConnection) -> None:
    """The data dictionary (deconflow/datadict.py) as COMMENT ON every table, view and
    column it describes: `duckdb_tables()`, `duckdb_columns()` and the CLI show it."""
    have: dict[str, set[str]] = {}
    for table, column in con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal"
    ).fetchall():
        have.setdefault(table, set()).add(column)
    for name, table in datadict.TABLES.items():
        if name not in have:
            continue
        kind = "VIEW" if table.view else "TABLE"
        con.execute(f'COMMENT ON {kind} "{name}" IS {sql_str(table.summary)}')
        for column, doc in table.columns.items():
            if column in have[name]:
                con.execute(f'COMMENT ON COLUMN "{name}"."{column}" IS {sql_str(doc)}')


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns with no value at all become text (DuckDB would type them NULL)."""
    empty = [c for c in df.columns if df[c].dtype == object and df[c].isna().all()]
    return df.astype({c: "string" for c in empty}) if empty else df


# Types of publication columns that may be NULL (others follow their value).
_PUBLICATION_TYPES = {"newest_landing_event_id": "Int64", "newest_landed_at": "datetime64[ns]"}


def _publication_frame(pub: dict) -> pd.DataFrame:
    """The one-row ``publication`` table with a type for every column, NULLs included."""
    cols = {}
    for k, v in pub.items():
        if v is pd.NA or v is pd.NaT or (isinstance(v, float) and v != v):
            v = None
        elif hasattr(v, "item") and not isinstance(v, pd.Timestamp):
            v = v.item()  # numpy scalars
        if v is None:
            dtype = _PUBLICATION_TYPES.get(k, "string")
        elif isinstance(v, bool):
            dtype = "boolean"
        elif isinstance(v, int):
            dtype = "Int64"
        elif isinstance(v, float):
            dtype = "Float64"
        elif isinstance(v, pd.Timestamp):
            dtype = "datetime64[ns]"
        else:
            dtype, v = "string", str(v)
        cols[k] = pd.Series([v], dtype=dtype)
    return pd.DataFrame(cols)


def _referenced_files(manifest: dict) -> list[str]:
    live_map = live_units_of(manifest)
    out = []
    for uid in manifest["units"]:
        if live_map.get(uid):
            out.extend(manifest["units"][uid]["files"].values())
    return sorted(out)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _user_stat(path: Path) -> dict | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _keep_user_changes(db_path: Path, store: Path, manifest: dict) -> list[str]:
    """Move aside a published file that a read-write session changed (with its WAL).

    The file and its WAL move together (renames keep the inodes), so the pair still opens
    and holds what the user wrote; a live session keeps writing to it unharmed.
    """
    wal = db_path.with_name(db_path.name + ".wal")
    current = _user_stat(db_path)
    recorded = manifest.get("user_file")
    changed = wal.exists() or (current is not None and recorded is not None and current != recorded)
    if not changed:
        return []
    aside = store / "replaced"
    aside.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:4]}"
    kept = []
    if current is not None:
        target = aside / f"{stamp}-{db_path.name}"
        os.rename(db_path, target)
        kept.append(str(target))
        if wal.exists():
            os.rename(wal, target.with_name(target.name + ".wal"))
            kept.append(str(target) + ".wal")
    elif wal.exists():
        target = aside / f"{stamp}-{wal.name}.orphan"
        os.rename(wal, target)
        kept.append(str(target))
    pairs = sorted(p for p in aside.iterdir() if p.name.endswith(db_path.name))
    for old in pairs[:-KEEP_REPLACED]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".wal").unlink(missing_ok=True)
    return kept


def _clean_tmp(db_path: Path, store: Path) -> None:
    """Temp files of earlier writers (killed or failed): we hold the lock, so none is live."""
    shutil.rmtree(store / "tmp", ignore_errors=True)
    for p in db_path.parent.glob(f".{db_path.name}.*.tmp*"):
        with contextlib.suppress(OSError):
            p.unlink()


def _gc(store: Path, manifest: dict, retain_s: float) -> bool:
    """Retire old snapshots, and the parts no current cell uses after ``retain_s``.

    An open snapshot stays readable after its file is deleted (POSIX), so snapshots go
    quickly (the newest few stay for readers between reading CURRENT and opening). The parts
    an old snapshot names are opened at query time, so they outlive it by ``retain_s``.
    """
    snaps = store / "snapshots"
    now = time.time()
    seqs = sorted(int(p.stem) for p in snaps.glob("*.duckdb") if p.stem.isdigit())
    keep = set(seqs[-KEEP_SNAPSHOTS:]) | {manifest["seq"]}
    for s in seqs:
        p = snaps / f"{s}.duckdb"
        with contextlib.suppress(FileNotFoundError):
            if s not in keep and now - p.stat().st_mtime >= SNAPSHOT_GRACE_S:
                p.unlink()
    still = []
    for g in manifest["garbage"]:
        if now - g["at"] >= retain_s:
            folder = store / g["dir"]
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.parent.rmdir()  # parts/cells/<key>, once its last version is gone
        else:
            still.append(g)
    changed = len(still) != len(manifest["garbage"])
    manifest["garbage"] = still
    return changed


# --- publishing ---------------------------------------------------------------------------


def publish_database(
    db_path: Path,
    runs: dict[str, Path],
    tables: dict[str, pd.DataFrame],
    info: dict | None = None,
    *,
    log: Callable[[str], None] | None = None,
    compact_budget_s: float | None = None,
) -> dict:
    """Publish the published runs and the analysis tables as a new snapshot of ``db_path``.

    Cost: one hard link per family file of each new or re-run cell, plus a snapshot of the
    small tables. Raises :class:`DiskFullError` / :class:`WriterBusy` (one line each) and
    leaves the published database as it was on any failure; temp files never stay behind.
    """
    log = log or (lambda m: None)
    db_path = Path(db_path)
    store = store_dir(db_path)
    retain_s = env_number("DECONFLOW_DB_RETAIN_S", DEFAULT_RETAIN_S)
    n_segment = segment_cells()
    if compact_budget_s is None:
        compact_budget_s = env_number("DECONFLOW_DB_COMPACT_BUDGET_S", DEFAULT_COMPACT_BUDGET_S)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with writer_lock(store):
            timings["lock_s"] = time.perf_counter() - t0
            _clean_tmp(db_path, store)
            try:
                report = _publish_locked(
                    db_path,
                    store,
                    runs,
                    tables,
                    dict(info or {}),
                    log,
                    timings,
                    compact_budget_s,
                    n_segment,
                    retain_s,
                )
            finally:
                shutil.rmtree(store / "tmp", ignore_errors=True)
                for p in db_path.parent.glob(f".{db_path.name}.*.tmp*"):
                    with contextlib.suppress(OSError):
                        p.unlink()
    except WarehouseError:
        raise
    except (OSError, duckdb.Error) as e:
        if is_disk_full(e):
            raise disk_full_error(db_path, store) from None
        raise
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return report


def _publish_locked(
    db_path, store, runs, tables, info, log, timings, budget_s, n_segment, retain_s
) -> dict:
    t = time.perf_counter()
    manifest = load_manifest(store)
    for sub in ("snapshots", "tmp", "parts"):
        (store / sub).mkdir(parents=True, exist_ok=True)
    # 1. Which cells are new, re-run or gone.
    new, changed, skipped = [], [], []
    seen = set()
    con = duckdb.connect()  # in memory: normalizing odd files and merging segments
    try:
        for key, run_dir in runs.items():
            try:
                sig, landed = cell_signature(run_dir)
            except FileNotFoundError:
                skipped.append(key)  # re-published under us: the next publication takes it
                continue
            old = manifest["cells"].get(key)
            if old is not None and old["sig"] == sig:
                seen.add(key)
                continue
            run_dir = Path(run_dir)
            if not (run_dir / SUMMARY).exists():
                continue  # not a finished publication (publish_run renames whole folders)
            seen.add(key)
            try:
                part = make_cell_part(store, key, sig, run_dir, con)
            except FileNotFoundError:
                skipped.append(key)
                if old is None:
                    seen.discard(key)
                continue
            uid = f"c-{key}-{sig}"
            manifest["units"][uid] = {
                "kind": "cell",
                "files": part["files"],
                "members": {key: sig},
                "created": manifest["seq"] + 1,
                "dir": str(Path("parts") / "cells" / key / sig),
            }
            manifest["cells"][key] = {
                "sig": sig,
                "unit": uid,
                "landed_at": landed,
                "rows": part["rows"],
            }
            (changed if old is not None else new).append(key)
        removed = [k for k in manifest["cells"] if k not in seen]
        for k in removed:
            del manifest["cells"][k]
        timings["parts_s"] = time.perf_counter() - t
        report = _commit(db_path, store, manifest, tables, info, log, timings)
        report.update(new=new, changed=changed, removed=removed, skipped=skipped)
        # 2. Compaction, after the new cells are visible: few large files for readers.
        merged = 0
        if budget_s > 0:
            t = time.perf_counter()
            try:
                merged = compact(store, manifest, con, n_segment, budget_s)
                if merged:
                    second = _commit(db_path, store, manifest, tables, info, log, {})
                    report["seq"], report["snapshot"] = second["seq"], second["snapshot"]
                    report["preserved"] += second["preserved"]
            except (OSError, duckdb.Error) as e:
                # The new cells are already published; merging waits for the next time.
                manifest = load_manifest(store)
                merged = 0
                log(f"compaction skipped: {str(e).splitlines()[0]}")
            timings["compaction_s"] = time.perf_counter() - t
        report["compacted_units"] = merged
        t = time.perf_counter()
        if _gc(store, manifest, retain_s):
            save_manifest(store, manifest)  # otherwise _commit saved it already
        timings["gc_s"] = time.perf_counter() - t
    finally:
        con.close()
    report["files"] = len(_referenced_files(manifest))
    return report


def _commit(db_path, store, manifest, tables, info, log, timings) -> dict:
    """Write snapshot seq+1, point CURRENT at it, replace the user-facing file."""
    t = time.perf_counter()
    retire_dead_units(manifest)
    seq = manifest["seq"] + 1
    cells = manifest["cells"]
    newest = max(cells.items(), key=lambda kv: kv[1]["landed_at"], default=(None, None))
    pub = {
        "published_at": pd.Timestamp.now(tz="UTC").floor("ms").tz_localize(None),
        "snapshot": seq,
        "cells": len(cells),
        "newest_landed_at": (
            pd.Timestamp(newest[1]["landed_at"], unit="s").floor("ms") if newest[0] else None
        ),
        "newest_landed_run_id": newest[0],
        **info,
    }
    (store / "tmp").mkdir(parents=True, exist_ok=True)
    (store / "snapshots").mkdir(parents=True, exist_ok=True)
    tmp_snap = store / "tmp" / f"{seq}.duckdb"
    counts = _write_snapshot(store, manifest, tables, pub, tmp_snap)
    timings["snapshot_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # The user-facing copy is made before anything becomes current: a full disk fails here
    # with the old publication intact.
    user_tmp = db_path.with_name(f".{db_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    shutil.copyfile(tmp_snap, user_tmp)
    os.chmod(user_tmp, 0o444 & ~current_umask())  # read-only; readable as the umask says
    _fsync_file(user_tmp)
    snap = store / "snapshots" / f"{seq}.duckdb"
    os.rename(tmp_snap, snap)
    manifest["seq"] = seq
    preserved = _keep_user_changes(db_path, store, manifest)
    for p in preserved:
        log(
            f"{db_path.name} had been changed by a read-write session: kept as {p} "
            "(open the published data read-only: cd <data folder> && duckdb -readonly)"
        )
    manifest["user_file"] = _user_stat(user_tmp)
    save_manifest(store, manifest)
    atomic_write_bytes(store / "CURRENT", lambda f: f.write(f"{seq}.duckdb\n".encode()))
    os.replace(user_tmp, db_path)
    timings["swap_s"] = time.perf_counter() - t
    return {"seq": seq, "snapshot": str(snap), "counts": counts, "preserved": preserved}


def compact_database(db_path: Path, budget_s: float | None = None, log=None) -> dict:
    """Merge every loose cell into segments (e.g. after a first publication of a large
    sweep), then publish the same tables again. ``budget_s=None``: until done."""
    db_path = Path(db_path)
    store = store_dir(db_path)
    log = log or (lambda m: None)
    t0 = time.perf_counter()
    try:
        with writer_lock(store):
            _clean_tmp(db_path, store)
            try:
                manifest = load_manifest(store)
                current = snapshot_path(db_path)
                tables, info = {}, {}
                con = duckdb.connect(str(current), read_only=True)
                try:
                    names = [
                        r[0]
                        for r in con.execute(
                            "SELECT table_name FROM duckdb_tables() WHERE NOT temporary"
                        ).fetchall()
                    ]
                    for name in names:
                        if name == PUBLICATION_TABLE:
                            row = con.execute(f"SELECT * FROM {name}").df()
                            info = {
                                k: v
                                for k, v in row.iloc[0].to_dict().items()
                                if k not in ("published_at", "snapshot", "cells")
                                and not k.startswith("newest_landed")
                            }
                        else:
                            tables[name] = con.execute(f'SELECT * FROM "{name}"').df()
                finally:
                    con.close()
                mem = duckdb.connect()
                try:
                    merged = compact(store, manifest, mem, segment_cells(), budget_s)
                finally:
                    mem.close()
                report = _commit(db_path, store, manifest, tables, info, log, {})
                _gc(store, manifest, env_number("DECONFLOW_DB_RETAIN_S", DEFAULT_RETAIN_S))
                save_manifest(store, manifest)
            finally:
                shutil.rmtree(store / "tmp", ignore_errors=True)
    except WarehouseError:
        raise
    except (OSError, duckdb.Error) as e:
        if is_disk_full(e):
            raise disk_full_error(db_path, store) from None
        raise
    report["compacted_cells"] = merged
    report["files"] = len(_referenced_files(manifest))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def segment_cells() -> int:
    return max(2, int(env_number("DECONFLOW_DB_SEGMENT_CELLS", DEFAULT_SEGMENT_CELLS)))


def build_database(db_path: Path, runs: dict[str, Path], tables: dict[str, pd.DataFrame]) -> dict:
    """Publish and return the row count of every table and view (compatibility wrapper)."""
    return publish_database(db_path, runs, tables)["counts"]
