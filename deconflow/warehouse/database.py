"""The DuckDB file users query, published by one writer at a cost that follows new data.

Layout, for the default ``data/deconflow.duckdb``::

    data/deconflow.duckdb         what users open (read-only, mode 0444): a copy of the current
                                  snapshot, replaced whole (os.replace) by every publication
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
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pandas as pd

from deconflow.atomic import atomic_write_bytes
from deconflow.protocol import FAMILIES, SUMMARY, family_file

MANIFEST_VERSION = 2
DEFAULT_SEGMENT_CELLS = 32
DEFAULT_RETAIN_S = 6 * 3600
DEFAULT_LOCK_TIMEOUT_S = 600
DEFAULT_COMPACT_BUDGET_S = 10.0
KEEP_SNAPSHOTS = 3
SNAPSHOT_GRACE_S = 120
KEEP_REPLACED = 5
PUBLICATION_TABLE = "publication"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


class WarehouseError(RuntimeError):
    """A publication that could not be made; the published database is unchanged."""


class DiskFullError(WarehouseError):
    pass


class WriterBusy(WarehouseError):
    pass


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise WarehouseError(f"{name} must be a number, got {raw!r}") from None


# --- where things are ---------------------------------------------------------------------


def store_dir(db_path: Path) -> Path:
    """The writer's folder next to the database file (``data/deconflow.warehouse``)."""
    return db_path.with_name(f"{db_path.stem}.warehouse")


def snapshot_path(db_path: Path) -> Path:
    """The current snapshot (what deconflow's readers open); ``db_path`` if there is none."""
    current = store_dir(db_path) / "CURRENT"
    try:
        name = current.read_text().strip()
    except FileNotFoundError:
        return db_path
    path = store_dir(db_path) / "snapshots" / name
    return path if path.exists() else db_path


def connect_readonly(db_path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the current snapshot: never blocked by a user's session."""
    for attempt in range(3):
        path = snapshot_path(db_path)
        if not path.exists():
            raise FileNotFoundError(f"no database at {db_path}")
        try:
            return duckdb.connect(str(path), read_only=True)
        except duckdb.IOException:
            # A snapshot retired between reading CURRENT and opening it: read CURRENT again.
            if attempt == 2 or snapshot_path(db_path) == path:
                raise
    raise AssertionError("unreachable")


# --- errors in one line -------------------------------------------------------------------


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, device) of the filesystem holding ``path``."""
    p = path
    while not p.exists():
        p = p.parent
    p = p.resolve()
    dev = p.stat().st_dev
    while p.parent != p and p.parent.stat().st_dev == dev:
        p = p.parent
    device = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[1] == str(p):
                device = parts[0]
    return str(p), device


def _disk_full_error(db_path: Path, where: Path) -> DiskFullError:
    mount, device = _mount_of(where)
    try:
        free = shutil.disk_usage(mount).free
        free_s = f"{free / 2**20:.1f} MiB free"
    except OSError:
        free_s = "free space unknown"
    return DiskFullError(
        f"disk full: {mount} ({device}, {free_s}) could not hold the new DuckDB publication "
        f"of {db_path}; the published database is unchanged"
    )


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    return isinstance(exc, duckdb.Error) and any(t in str(exc) for t in _DISK_FULL_TEXT)


# --- the writer lock ----------------------------------------------------------------------


@contextlib.contextmanager
def writer_lock(store: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the single-writer lock. A killed writer's lock dies with its process (flock)."""
    if timeout_s is None:
        timeout_s = _env_number("DECONFLOW_DB_LOCK_TIMEOUT_S", DEFAULT_LOCK_TIMEOUT_S)
    store.mkdir(parents=True, exist_ok=True)
    path = store / "writer.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= timeout_s:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise WriterBusy(
                        f"another DuckDB writer (pid {holder}) has held {path} for over "
                        f"{timeout_s:.0f} s; the published database is unchanged"
                    ) from None
                time.sleep(0.1)  # interruptible: SIGTERM/SIGINT land between sleeps
        with contextlib.suppress(OSError):  # the pid is informative; a full disk is no reason
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# --- manifest -----------------------------------------------------------------------------


def _empty_manifest() -> dict:
    return {"version": MANIFEST_VERSION, "seq": 0, "cells": {}, "units": {}, "garbage": []}


def _load_manifest(store: Path) -> dict:
    path = store / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        return _empty_manifest()
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A manifest is only ever replaced whole, so this is damage from outside: start over
        # (parts are rebuilt from the published runs; old files are left for the GC).
        return _empty_manifest()
    if m.get("version") != MANIFEST_VERSION:
        return _empty_manifest()
    return m


def _save_manifest(store: Path, manifest: dict) -> None:
    data = json.dumps(manifest, separators=(",", ":")).encode()
    atomic_write_bytes(store / "manifest.json", lambda f: f.write(data))


def _live_map(manifest: dict) -> dict[str, list[str]]:
    """Per unit, the cells whose current rows it holds (one pass over the cells: a cell's
    ``unit`` always names a unit that holds its current version)."""
    live: dict[str, list[str]] = {uid: [] for uid in manifest["units"]}
    for key, cell in manifest["cells"].items():
        live.setdefault(cell["unit"], []).append(key)
    return live


# --- cells and their parts ----------------------------------------------------------------


def cell_signature(run_dir) -> tuple[str, float]:
    """(version id, landing time) of a published cell folder: one stat.

    Publishing replaces a cell's folder whole (a new directory, filled, then renamed into
    place), so the directory's inode and mtime identify one publication of the cell, and
    the mtime is when it was published.
    """
    st = os.stat(run_dir)
    raw = f"{st.st_ino}:{st.st_mtime_ns}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12], st.st_mtime


def scan_published(runs_root: Path, keys=None) -> dict[str, str]:
    """Published cell folders by key (only ``keys`` when given): one directory scan, no
    per-cell stat. Dot-folders are a publication in progress or its leftovers."""
    out: dict[str, str] = {}
    try:
        with os.scandir(runs_root) as it:
            for e in it:
                if e.name.startswith(".") or (keys is not None and e.name not in keys):
                    continue
                if e.is_dir(follow_symlinks=False):
                    out[e.name] = e.path
    except FileNotFoundError:
        pass
    return dict(sorted(out.items()))


def _canonical(schema, family: str) -> bool:
    import pyarrow as pa

    want = ["run_id", *FAMILIES[family]]
    if schema.names != want:
        return False
    for name in want:
        t = schema.field(name).type
        ok = (
            (pa.types.is_string(t) or pa.types.is_large_string(t))
            if name == "run_id"
            else (t == pa.int64() if name == "step" else t == pa.float64())
        )
        if not ok:
            return False
    return True


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _normalize(con: duckdb.DuckDBPyConnection, src: Path, dst: Path, family: str) -> None:
    """Rewrite one cell's file in the canonical column order and types."""
    have = set(
        con.execute(f"DESCRIBE SELECT * FROM read_parquet({_sql_str(src)})").df()["column_name"]
    )
    cols = []
    for name in ["run_id", *FAMILIES[family]]:
        typ = "VARCHAR" if name == "run_id" else ("BIGINT" if name == "step" else "DOUBLE")
        expr = f'CAST("{name}" AS {typ})' if name in have else f"CAST(NULL AS {typ})"
        cols.append(f'{expr} AS "{name}"')
    con.execute(
        f"COPY (SELECT {', '.join(cols)} FROM read_parquet({_sql_str(src)})) "
        f"TO {_sql_str(dst)} (FORMAT parquet)"
    )


def _make_cell_part(store: Path, key: str, sig: str, run_dir: Path, con) -> dict:
    """Link (or, if needed, normalize) one published cell's family files into the store."""
    import pyarrow.parquet as pq

    rel = Path("parts") / "cells" / key / sig
    dest = store / rel
    files, rows = {}, {}
    tmp = store / "tmp" / f"cell-{key}-{sig}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    for family in FAMILIES:
        src = run_dir / family_file(family)
        if not src.exists():
            continue
        meta = pq.ParquetFile(src)
        rows[family] = int(meta.metadata.num_rows)
        out = tmp / family_file(family)
        if _canonical(meta.schema_arrow, family):
            try:
                os.link(src, out)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(src, out)
        else:
            _normalize(con, src, out, family)
        files[family] = str(rel / family_file(family))
    if dest.exists():  # left by a writer killed after this rename: same version, same files
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, dest)
    return {"files": files, "rows": rows}


# --- SQL over parts -----------------------------------------------------------------------


def _cols(family: str) -> str:
    return ", ".join(f'"{c}"' for c in ["run_id", *FAMILIES[family]])


def _empty_select(family: str) -> str:
    cols = []
    for name in ["run_id", *FAMILIES[family]]:
        typ = "VARCHAR" if name == "run_id" else ("BIGINT" if name == "step" else "DOUBLE")
        cols.append(f'CAST(NULL AS {typ}) AS "{name}"')
    return f"SELECT {', '.join(cols)} WHERE false"


def _family_select(
    store: Path, manifest: dict, family: str, uids: list[str], live_map: dict
) -> str | None:
    """SELECT of the live rows of ``family`` in the given units (None if there are none)."""
    clean, parts = [], []
    for uid in uids:
        unit = manifest["units"][uid]
        rel = unit["files"].get(family)
        if rel is None:
            continue
        live = live_map.get(uid, [])
        if not live:
            continue
        path = _sql_str(store / rel)
        if len(live) == len(unit["members"]):
            clean.append(path)
        else:  # a segment holding superseded cells: read only the cells still current there
            keys = ", ".join(_sql_str(k) for k in sorted(live))
            parts.append(
                f"SELECT {_cols(family)} FROM read_parquet({path}) WHERE run_id IN ({keys})"
            )
    if clean:
        parts.insert(0, f"SELECT {_cols(family)} FROM read_parquet([{', '.join(clean)}])")
    return " UNION ALL ".join(parts) if parts else None


def _unit_order(manifest: dict) -> list[str]:
    return sorted(manifest["units"], key=lambda u: (manifest["units"][u]["created"], u))


# --- the snapshot -------------------------------------------------------------------------


def _write_snapshot(
    store: Path, manifest: dict, tables: dict[str, pd.DataFrame], info: dict, path: Path
) -> dict[str, int]:
    uids = _unit_order(manifest)
    live_map = _live_map(manifest)
    counts: dict[str, int] = {}
    con = duckdb.connect(str(path))
    try:
        for family in FAMILIES:
            sql = _family_select(store, manifest, family, uids, live_map) or _empty_select(family)
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
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return counts


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
    live_map = _live_map(manifest)
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


def _retire_dead_units(manifest: dict) -> bool:
    """Units with no current cell left go to the garbage list (deleted after retention)."""
    live_map = _live_map(manifest)
    dead = [uid for uid in manifest["units"] if not live_map.get(uid)]
    for uid in dead:
        unit = manifest["units"].pop(uid)
        manifest["garbage"].append({"dir": unit["dir"], "at": time.time()})
    return bool(dead)


# --- compaction ---------------------------------------------------------------------------


def _merge(store: Path, manifest: dict, sources: list[str], con) -> str:
    """Merge the live rows of ``sources`` into one new segment unit; returns its id."""
    seg = f"s{manifest['seq'] + 1}-{uuid.uuid4().hex[:6]}"
    rel = Path("parts") / "segments" / seg
    tmp = store / "tmp" / f"segment-{seg}"
    tmp.mkdir(parents=True)
    live_map = _live_map(manifest)
    members = {}
    for uid in sources:
        for k in live_map.get(uid, []):
            members[k] = manifest["cells"][k]["sig"]
    files = {}
    for family in FAMILIES:
        select = _family_select(store, manifest, family, sources, live_map)
        if select is None:
            continue
        con.execute(
            f"COPY ({select} ORDER BY run_id, step) TO {_sql_str(tmp / family_file(family))} "
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


def _next_job(manifest: dict, segment_cells: int) -> list[str] | None:
    """The next merge: the oldest ``segment_cells`` loose cells, else the segment holding
    the most superseded cells (rewritten with its current cells only), else nothing."""
    order = _unit_order(manifest)
    live_map = _live_map(manifest)
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


def _compact(store: Path, manifest: dict, con, segment_cells: int, budget_s: float | None) -> int:
    """Merge until nothing is left to merge or ``budget_s`` is spent; returns cells merged.
    Each merge costs at most ``segment_cells`` cells of rows, never the sweep's size."""
    t0 = time.perf_counter()
    merged = 0
    while budget_s is None or time.perf_counter() - t0 < budget_s:
        job = _next_job(manifest, segment_cells)
        if job is None:
            break
        _merge(store, manifest, job, con)
        merged += len(job)
        _retire_dead_units(manifest)
    return merged


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
    retain_s = _env_number("DECONFLOW_DB_RETAIN_S", DEFAULT_RETAIN_S)
    n_segment = segment_cells()
    if compact_budget_s is None:
        compact_budget_s = _env_number("DECONFLOW_DB_COMPACT_BUDGET_S", DEFAULT_COMPACT_BUDGET_S)
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
        if _is_disk_full(e):
            raise _disk_full_error(db_path, store) from None
        raise
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return report


def _publish_locked(
    db_path, store, runs, tables, info, log, timings, budget_s, n_segment, retain_s
) -> dict:
    t = time.perf_counter()
    manifest = _load_manifest(store)
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
                part = _make_cell_part(store, key, sig, run_dir, con)
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
                merged = _compact(store, manifest, con, n_segment, budget_s)
                if merged:
                    second = _commit(db_path, store, manifest, tables, info, log, {})
                    report["seq"], report["snapshot"] = second["seq"], second["snapshot"]
                    report["preserved"] += second["preserved"]
            except (OSError, duckdb.Error) as e:
                # The new cells are already published; merging waits for the next time.
                manifest = _load_manifest(store)
                merged = 0
                log(f"compaction skipped: {str(e).splitlines()[0]}")
            timings["compaction_s"] = time.perf_counter() - t
        report["compacted_units"] = merged
        t = time.perf_counter()
        if _gc(store, manifest, retain_s):
            _save_manifest(store, manifest)  # otherwise _commit saved it already
        timings["gc_s"] = time.perf_counter() - t
    finally:
        con.close()
    report["files"] = len(_referenced_files(manifest))
    return report


def _commit(db_path, store, manifest, tables, info, log, timings) -> dict:
    """Write snapshot seq+1, point CURRENT at it, replace the user-facing file."""
    t = time.perf_counter()
    _retire_dead_units(manifest)
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
    os.chmod(user_tmp, 0o444)
    _fsync_file(user_tmp)
    snap = store / "snapshots" / f"{seq}.duckdb"
    os.rename(tmp_snap, snap)
    manifest["seq"] = seq
    preserved = _keep_user_changes(db_path, store, manifest)
    for p in preserved:
        log(
            f"{db_path.name} had been changed by a read-write session: kept as {p} "
            "(open the published data read-only: duckdb -readonly)"
        )
    manifest["user_file"] = _user_stat(user_tmp)
    _save_manifest(store, manifest)
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
                manifest = _load_manifest(store)
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
                    merged = _compact(store, manifest, mem, segment_cells(), budget_s)
                finally:
                    mem.close()
                report = _commit(db_path, store, manifest, tables, info, log, {})
                _gc(store, manifest, _env_number("DECONFLOW_DB_RETAIN_S", DEFAULT_RETAIN_S))
                _save_manifest(store, manifest)
            finally:
                shutil.rmtree(store / "tmp", ignore_errors=True)
    except WarehouseError:
        raise
    except (OSError, duckdb.Error) as e:
        if _is_disk_full(e):
            raise _disk_full_error(db_path, store) from None
        raise
    report["compacted_cells"] = merged
    report["files"] = len(_referenced_files(manifest))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def segment_cells() -> int:
    return max(2, int(_env_number("DECONFLOW_DB_SEGMENT_CELLS", DEFAULT_SEGMENT_CELLS)))


def build_database(db_path: Path, runs: dict[str, Path], tables: dict[str, pd.DataFrame]) -> dict:
    """Publish and return the row count of every table and view (compatibility wrapper)."""
    return publish_database(db_path, runs, tables)["counts"]
