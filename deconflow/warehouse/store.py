"""The DuckDB warehouse's store: where its files are, the writer lock, the manifest of
per-cell Parquet parts, and the SQL that reads them; one-line errors (disk full, busy writer)."""

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
from collections.abc import Iterator
from pathlib import Path

import duckdb

from deconflow.atomic import atomic_write_bytes
from deconflow.protocol import FAMILIES, family_file

MANIFEST_VERSION = 2
DEFAULT_SEGMENT_CELLS = 32
DEFAULT_RETAIN_S = 6 * 3600
DEFAULT_LOCK_TIMEOUT_S = 600
DEFAULT_COMPACT_BUDGET_S = 10.0
KEEP_SNAPSHOTS = 3
SNAPSHOT_GRACE_S = 120
KEEP_REPLACED = 5
PUBLICATION_TABLE = "publication"
# Snapshots are written in a storage format that the documented `duckdb` CLI (pip
# duckdb-cli 1.5.x, which reads storage versions up to v1.5) opens; Python duckdb 2.0 would
# otherwise write a newer one that CLI refuses.
STORAGE_VERSION = "v1.5.0"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


class WarehouseError(RuntimeError):
    """A publication that could not be made; the published database is unchanged."""


class DiskFullError(WarehouseError):
    pass


class WriterBusy(WarehouseError):
    pass


def env_number(name: str, default: float | None = None) -> float:
    """A numeric ``DECONFLOW_DB_*`` setting (checked by :mod:`deconflow.settings`)."""
    from deconflow import settings

    try:
        value = settings.get(name)
    except settings.SettingError as e:
        raise WarehouseError(str(e)) from None
    return default if value is None else value


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


def connect_writable(path: Path) -> duckdb.DuckDBPyConnection:
    """A new snapshot file: in the CLI-readable storage format, relative paths resolved
    against the folder of the user-facing database (the snapshot's store's parent)."""
    con = duckdb.connect(str(path), config={"storage_compatibility_version": STORAGE_VERSION})
    return con


def set_search_path(con: duckdb.DuckDBPyConnection, db_path: Path) -> None:
    """The views name their Parquet parts relative to the database file's folder (so the
    data folder can be copied or moved): resolve them there, wherever the process runs."""
    con.execute(f"SET file_search_path = {sql_str(folder_of(db_path))}")


def folder_of(db_path: Path) -> Path:
    """The folder the views' relative paths start from: the user-facing file's folder, also
    when ``db_path`` is one of its snapshots (``<db>.warehouse/snapshots/<seq>.duckdb``)."""
    path = Path(db_path).resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.endswith(".warehouse"):
        return path.parent.parent.parent
    return path.parent


def connect_readonly(db_path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the current snapshot: never blocked by a user's session.

    The metric views read ``deconflow.warehouse/parts/...`` relative to the folder of
    ``db_path``; this connection resolves them there (``file_search_path``). Another
    program does the same with ``SET file_search_path = '<data folder>'``, or by running
    in the data folder (``cd data && duckdb -readonly deconflow.duckdb``)."""
    for attempt in range(3):
        path = snapshot_path(db_path)
        if not path.exists():
            raise FileNotFoundError(f"no database at {db_path}")
        try:
            con = duckdb.connect(str(path), read_only=True)
            set_search_path(con, db_path)
            return con
        except duckdb.IOException:
            # A snapshot retired between reading CURRENT and opening it: read CURRENT again.
            if attempt == 2 or snapshot_path(db_path) == path:
                raise
    raise AssertionError("unreachable")


# --- errors in one line -------------------------------------------------------------------


def mount_of(path: Path) -> tuple[str, str]:
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


def disk_full_error(db_path: Path, where: Path) -> DiskFullError:
    mount, device = mount_of(where)
    try:
        free = shutil.disk_usage(mount).free
        free_s = f"{free / 2**20:.1f} MiB free"
    except OSError:
        free_s = "free space unknown"
    return DiskFullError(
        f"disk full: {mount} ({device}, {free_s}) could not hold the new DuckDB publication "
        f"of {db_path}; the published database is unchanged"
    )


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    return isinstance(exc, duckdb.Error) and any(t in str(exc) for t in DISK_FULL_TEXT)


# --- the writer lock ----------------------------------------------------------------------


@contextlib.contextmanager
def writer_lock(store: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the single-writer lock. A killed writer's lock dies with its process (flock)."""
    if timeout_s is None:
        timeout_s = env_number("DECONFLOW_DB_LOCK_TIMEOUT_S", DEFAULT_LOCK_TIMEOUT_S)
    store.mkdir(parents=True, exist_ok=True)
    path = store / "writer.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask: a lab group shares it
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


def empty_manifest() -> dict:
    return {"version": MANIFEST_VERSION, "seq": 0, "cells": {}, "units": {}, "garbage": []}


def load_manifest(store: Path) -> dict:
    path = store / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        return empty_manifest()
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A manifest is only ever replaced whole, so this is damage from outside: start over
        # (parts are rebuilt from the published runs; old files are left for the GC).
        return empty_manifest()
    if m.get("version") != MANIFEST_VERSION:
        return empty_manifest()
    return m


def save_manifest(store: Path, manifest: dict) -> None:
    data = json.dumps(manifest, separators=(",", ":")).encode()
    atomic_write_bytes(store / "manifest.json", lambda f: f.write(data))


def live_units_of(manifest: dict) -> dict[str, list[str]]:
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


def canonical(schema, family: str) -> bool:
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


def sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def normalize(con: duckdb.DuckDBPyConnection, src: Path, dst: Path, family: str) -> None:
    """Rewrite one cell's file in the canonical column order and types."""
    have = set(
        con.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_str(src)})").df()["column_name"]
    )
    cols = []
    for name in ["run_id", *FAMILIES[family]]:
        typ = "VARCHAR" if name == "run_id" else ("BIGINT" if name == "step" else "DOUBLE")
        expr = f'CAST("{name}" AS {typ})' if name in have else f"CAST(NULL AS {typ})"
        cols.append(f'{expr} AS "{name}"')
    con.execute(
        f"COPY (SELECT {', '.join(cols)} FROM read_parquet({sql_str(src)})) "
        f"TO {sql_str(dst)} (FORMAT parquet)"
    )


def make_cell_part(store: Path, key: str, sig: str, run_dir: Path, con) -> dict:
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
        if canonical(meta.schema_arrow, family):
            try:
                os.link(src, out)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(src, out)
        else:
            normalize(con, src, out, family)
        files[family] = str(rel / family_file(family))
    if dest.exists():  # left by a writer killed after this rename: same version, same files
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, dest)
    return {"files": files, "rows": rows}


# --- SQL over parts -----------------------------------------------------------------------


def family_cols(family: str) -> str:
    return ", ".join(f'"{c}"' for c in ["run_id", *FAMILIES[family]])


def empty_select(family: str) -> str:
    cols = []
    for name in ["run_id", *FAMILIES[family]]:
        typ = "VARCHAR" if name == "run_id" else ("BIGINT" if name == "step" else "DOUBLE")
        cols.append(f'CAST(NULL AS {typ}) AS "{name}"')
    return f"SELECT {', '.join(cols)} WHERE false"


def family_select(
    store: Path,
    manifest: dict,
    family: str,
    uids: list[str],
    live_map: dict,
    base: Path | None = None,
) -> str | None:
    """SELECT of the live rows of ``family`` in the given units (None if there are none).

    With ``base``, file paths are written relative to it (the views of a snapshot: relative
    to the database file's folder, so a moved data folder reads its own parts)."""
    clean, parts = [], []
    for uid in uids:
        unit = manifest["units"][uid]
        rel = unit["files"].get(family)
        if rel is None:
            continue
        live = live_map.get(uid, [])
        if not live:
            continue
        path = sql_str(os.path.relpath(store / rel, base) if base else store / rel)
        if len(live) == len(unit["members"]):
            clean.append(path)
        else:  # a segment holding superseded cells: read only the cells still current there
            keys = ", ".join(sql_str(k) for k in sorted(live))
            parts.append(
                f"SELECT {family_cols(family)} FROM read_parquet({path}) WHERE run_id IN ({keys})"
            )
    if clean:
        parts.insert(0, f"SELECT {family_cols(family)} FROM read_parquet([{', '.join(clean)}])")
    return " UNION ALL ".join(parts) if parts else None


def unit_order(manifest: dict) -> list[str]:
    return sorted(manifest["units"], key=lambda u: (manifest["units"][u]["created"], u))
