"""The published DuckDB file against what users and faults do to it (real DuckDB files,
real processes): a read-write session, a stale WAL, a writer killed mid-write, a full disk,
two writers, readers during publications. Publishing must go on, reading must never break,
nothing a user wrote is silently lost, and temp files never stay behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from bench.analysis_scale import synth_run
from deconflow.status import run_sql
from deconflow.sweep import load_grid
from deconflow.warehouse.database import (
    DiskFullError,
    WriterBusy,
    publish_database,
    snapshot_path,
    store_dir,
    writer_lock,
)

pytestmark = pytest.mark.slow  # materializes and kills writers

REPO = Path(__file__).resolve().parents[1]
CELLS = load_grid().cells
STEPS = 1200  # 3 epochs of 390 steps: every family has rows


def _runs(root: Path, n: int, start: int = 0, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    out = {}
    for cell in CELLS[start : start + n]:
        d = root / "runs" / cell.key
        d.mkdir(parents=True, exist_ok=True)
        synth_run(d, cell.key, STEPS, rng)
        out[cell.key] = d
    return out


def _tables(runs: dict[str, Path]) -> dict[str, pd.DataFrame]:
    return {"runs": pd.DataFrame({"run_id": list(runs), "status": "materialized"})}


def _leftovers(db: Path) -> list[str]:
    tmp = store_dir(db) / "tmp"
    left = [p.name for p in db.parent.glob(f".{db.name}.*")]
    if tmp.exists():
        left += [p.name for p in tmp.iterdir()]
    return left


def _count(path: Path, folder: Path | None = None) -> int:
    """Cells in batch_metrics, read as a user does: the views' parts are relative to the
    data folder (``folder``; default the file's own)."""
    search = str(folder or path.parent)
    con = duckdb.connect(str(path), read_only=True, config={"file_search_path": search})
    try:
        return con.execute("SELECT count(DISTINCT run_id) FROM batch_metrics").fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("DECONFLOW_DATA", str(tmp_path))
    monkeypatch.delenv("DECONFLOW_DB", raising=False)
    return tmp_path


def _session(db: Path, hold: bool = True) -> subprocess.Popen:
    """A user's read-write duckdb session that writes a table and stays open."""
    code = textwrap.dedent(
        f"""
        import duckdb, sys, time
        con = duckdb.connect({str(db)!r})
        con.execute("CREATE TABLE my_notes AS SELECT 42 AS answer")
        print("written", flush=True)
        sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "written"
    return proc


def test_read_write_session_and_its_stale_wal_break_nothing(data):
    db = data / "deconflow.duckdb"
    runs = _runs(data, 3)
    publish_database(db, runs, _tables(runs))
    assert os.stat(db).st_mode & 0o777 == 0o444  # steers users to read-only opens

    user = _session(db)  # live read-write session with an unsaved table (in its WAL)
    try:
        assert (db.parent / (db.name + ".wal")).exists()
        # Reading: deconflow's readers open the snapshot, not the file the user holds.
        assert run_sql("SELECT count(*) AS n FROM runs")["n"].tolist() == [3]
        # Publishing goes on while the session holds its lock.
        runs.update(_runs(data, 1, start=3))
        report = publish_database(db, runs, _tables(runs))
        assert report["new"] == [CELLS[3].key]
        kept = [Path(p) for p in report["preserved"]]
        assert kept and kept[0].exists(), "the user's changed file is kept, not dropped"
        # The published path is a fresh file: a read-only open works despite the session.
        assert _count(db) == 4
    finally:
        user.kill()  # killed mid-session: its WAL stays behind
        user.wait()

    # Killed session: the kept pair (file + WAL) still opens and holds the user's table.
    con = duckdb.connect(str(kept[0]), read_only=True)
    assert con.execute("SELECT answer FROM my_notes").fetchone() == (42,)
    con.close()

    # A stale WAL next to the published file (written by a session that opened it after
    # the publication and died): deconflow sql still reads, the next publication moves it
    # aside, and `duckdb -readonly` works again.
    user = _session(db)
    user.kill()
    user.wait()
    wal = db.parent / (db.name + ".wal")
    assert wal.exists()
    assert run_sql("SELECT count(DISTINCT run_id) AS n FROM batch_metrics")["n"].tolist() == [4]
    report = publish_database(db, runs, _tables(runs))
    assert not wal.exists() and report["preserved"]
    assert _count(db) == 4
    assert _leftovers(db) == []


def test_writer_killed_mid_write_leaves_the_old_database_and_no_temp_files(data):
    db = data / "deconflow.duckdb"
    runs = _runs(data, 4)
    publish_database(db, runs, _tables(runs))
    assert _count(db) == 4
    more = _runs(data, 4, start=4, seed=1)
    every = {**runs, **more}
    listing = json.dumps({k: str(v) for k, v in every.items()})
    # A writer that publishes over and over (compaction every 2 cells: merges too),
    # SIGKILLed at random moments.
    code = textwrap.dedent(
        f"""
        import json, os, sys
        from pathlib import Path
        import pandas as pd
        sys.path.insert(0, {str(REPO)!r})
        os.environ["DECONFLOW_DB_SEGMENT_CELLS"] = "2"
        from deconflow.warehouse.database import publish_database
        runs = {{k: Path(v) for k, v in json.loads({listing!r}).items()}}
        keys = sorted(runs)
        i = 0
        print("ready", flush=True)
        while True:
            i += 1
            sub = {{k: runs[k] for k in keys[: 4 + i % 5]}}
            publish_database(Path({str(db)!r}), sub,
                             {{"runs": pd.DataFrame({{"run_id": list(sub)}})}})
        """
    )
    rng = random.Random(7)
    saw_leftovers = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saw_leftovers += bool(_leftovers(db))
        # Whatever the moment: the published file and the snapshot are whole and readable.
        assert 4 <= _count(db) <= 8
        assert 4 <= _count(snapshot_path(db), db.parent) <= 8
    # The next writer is not blocked (flock died with the process) and cleans up.
    t0 = time.monotonic()
    report = publish_database(db, every, _tables(every))
    assert time.monotonic() - t0 < 10
    assert _count(db) == 8 and report["counts"]["runs"] == 8
    assert _leftovers(db) == []
    print(f"kills that left temp files behind (then removed): {saw_leftovers} of 8")


def test_two_writers_take_turns_and_a_busy_writer_is_one_line(data, monkeypatch):
    db = data / "deconflow.duckdb"
    runs = _runs(data, 4)
    errors = []

    def publish(sub):
        try:
            publish_database(db, sub, _tables(sub))
        except Exception as e:  # pragma: no cover - the assertion below shows it
            errors.append(e)

    keys = sorted(runs)
    threads = [
        threading.Thread(target=publish, args=({k: runs[k] for k in keys[:n]},)) for n in (2, 3, 4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 2 <= _count(db) <= 4

    # A writer that holds the lock too long: a clear one-line error, nothing changed.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[2]);"
            "from pathlib import Path;"
            "from deconflow.warehouse.database import writer_lock;"
            "ctx = writer_lock(Path(sys.argv[1])); ctx.__enter__();"
            "print('held', flush=True); time.sleep(600)",
            str(store_dir(db)),
            str(REPO),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setenv("DECONFLOW_DB_LOCK_TIMEOUT_S", "1")
    before = _count(db)
    with pytest.raises(WriterBusy) as e:
        publish_database(db, runs, _tables(runs))
    assert "\n" not in str(e.value) and f"pid {holder.pid}" in str(e.value)
    assert _count(db) == before
    holder.kill()  # the holder dies: its lock goes with it
    holder.wait()
    with writer_lock(store_dir(db), timeout_s=2):
        pass
    publish_database(db, runs, _tables(runs))
    assert _count(db) == 4


def test_readers_never_fail_during_publications(data, monkeypatch):
    monkeypatch.setenv("DECONFLOW_DB_SEGMENT_CELLS", "2")  # merges and GC on most rounds
    db = data / "deconflow.duckdb"
    runs = _runs(data, 2)
    publish_database(db, runs, _tables(runs))
    stop = threading.Event()
    problems, reads = [], [0]

    def reader(user_path: bool):
        while not stop.is_set():
            try:
                if user_path:
                    con = duckdb.connect(
                        str(db), read_only=True, config={"file_search_path": str(db.parent)}
                    )
                else:
                    from deconflow.warehouse.database import connect_readonly

                    con = connect_readonly(db)
                n, cells = con.execute(
                    "SELECT (SELECT count(DISTINCT run_id) FROM batch_metrics), "
                    "(SELECT cells FROM publication)"
                ).fetchone()
                con.close()
                if n != cells:
                    problems.append(f"snapshot of {cells} cells shows {n}")
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                problems.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=reader, args=(u,)) for u in (True, False)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            runs.update(_runs(data, 1, start=2 + i, seed=i))
            if i % 3 == 2:  # a re-run replaces a cell's folder whole, as publishing does
                shutil.rmtree(runs[CELLS[0].key])
                runs.update(_runs(data, 1, start=0, seed=100 + i))
            publish_database(db, runs, _tables(runs))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == [], problems[:5]
    assert reads[0] > 20
    con = duckdb.connect(str(db), read_only=True, config={"file_search_path": str(db.parent)})
    dups = con.execute(
        "SELECT run_id, step FROM batch_metrics GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 1"
    ).fetchall()
    assert dups == [] and _count(db) == 12


DISK_FULL_SCRIPT = """
import os, sys
from pathlib import Path
import numpy as np, pandas as pd
sys.path.insert(0, sys.argv[2])
from bench.analysis_scale import synth_run
from deconflow.sweep import load_grid
from deconflow.warehouse.database import DiskFullError, publish_database, store_dir

root = Path(sys.argv[1])
cells = load_grid().cells
rng = np.random.default_rng(0)
runs = {}
def add(i):
    d = root / "runs" / cells[i].key
    d.mkdir(parents=True)
    synth_run(d, cells[i].key, 1200, rng)
    runs[cells[i].key] = d
for i in range(3):
    add(i)
db = root / "deconflow.duckdb"
tables = lambda: {"runs": pd.DataFrame({"run_id": list(runs), "x": np.arange(len(runs))})}
publish_database(db, runs, tables())
add(3)
# Fill the disk, leaving a few KB.
filler = root / "filler"
with open(filler, "wb") as f:
    try:
        while True:
            f.write(b"x" * 65536)
    except OSError:
        pass
try:
    with open(filler, "ab") as f:
        f.truncate(max(0, f.tell() - 16384))
except OSError:
    pass
try:
    publish_database(db, runs, tables())
    print("RESULT no error")
except DiskFullError as e:
    print("RESULT " + str(e))
import duckdb
con = duckdb.connect(str(db), read_only=True, config={"file_search_path": str(db.parent)})
print("OLD", con.execute("SELECT count(DISTINCT run_id) FROM batch_metrics").fetchone()[0])
con.close()
left = [p.name for p in root.glob(".deconflow.duckdb.*")]
tmp = store_dir(db) / "tmp"
left += [p.name for p in tmp.iterdir()] if tmp.exists() else []
print("LEFT", left)
filler.unlink()
publish_database(db, runs, tables())
con = duckdb.connect(str(db), read_only=True, config={"file_search_path": str(db.parent)})
print("NEW", con.execute("SELECT count(DISTINCT run_id) FROM batch_metrics").fetchone()[0])
"""


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
    )
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (unshare -m)")
def test_full_disk_is_one_line_naming_the_disk_and_keeps_the_old_database(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL_SCRIPT)
    r = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=4m deconflow-test-disk {mnt} && "
            f"{sys.executable} {script} {mnt} {REPO}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    msg = out["RESULT"]
    assert msg.startswith("disk full: ") and str(mnt) in msg and "deconflow-test-disk" in msg
    assert "the published database is unchanged" in msg
    assert out["OLD"] == "3"  # the old publication, intact and readable
    assert out["LEFT"] == "[]"  # no temp file keeps the disk full
    assert out["NEW"] == "4"  # space back: the next publication goes through
    assert DiskFullError.__mro__[1].__name__ == "WarehouseError"


ASSET_DISK_FULL_SCRIPT = """
import os, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[2])
import dagster as dg
from bench.analysis_scale import synth_run
from deconflow.instance import ensure_dagster_home
from deconflow.sweep import load_grid
from tests.helpers import asset, downstream, make_defs

root = Path(sys.argv[1])
os.environ["DECONFLOW_DATA"] = str(root)
ensure_dagster_home()  # DAGSTER_HOME is outside the small disk; the duckdb pool has 1 slot
cells = load_grid().cells
rng = np.random.default_rng(0)
def add(i):
    d = root / "runs" / cells[i].key
    d.mkdir(parents=True)
    synth_run(d, cells[i].key, 1200, rng)
for i in range(2):
    add(i)
instance = dg.DagsterInstance.get()
defs = make_defs()
quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
assert dg.materialize(downstream(defs, through="sweep_db"), instance=instance,
                      run_config=quiet).success
add(2)
filler = root / "filler"
with open(filler, "wb") as f:
    try:
        while True:
            f.write(b"x" * 65536)
    except OSError:
        pass
res = dg.materialize([asset(defs, "sweep_db")], instance=instance, raise_on_error=False,
                     run_config=quiet, selection=["sweep_db"])
def failure(res):
    fail = [e for e in res.all_events if e.is_step_failure][0].step_failure_data
    if fail.user_failure_data:
        return fail.user_failure_data.description
    return fail.error.to_string().replace("\\n", " | ")
print("FAILURE", failure(res))
info = instance.event_log_storage.get_concurrency_info("duckdb")
print("CLAIMED", len(info.claimed_slots), "PENDING", len(info.pending_steps))
filler.unlink()
res = dg.materialize([asset(defs, "sweep_db")], instance=instance, raise_on_error=False,
                     run_config=quiet, selection=["sweep_db"])
print("AGAIN", res.success if res.success else failure(res))
"""


@pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (unshare -m)")
def test_full_disk_fails_the_sweep_db_run_in_one_line_and_frees_the_pool(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(ASSET_DISK_FULL_SCRIPT)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
    r = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=24m deconflow-test-disk {mnt} && "
            f"{sys.executable} {script} {mnt} {REPO}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert out["FAILURE"].startswith("disk full: ") and "\n" not in out["FAILURE"]
    assert "the published database is unchanged" in out["FAILURE"]
    assert out["CLAIMED"].startswith("0 PENDING 0")  # the duckdb slot is free again
    assert out["AGAIN"] == "True"  # and the next writer goes through at once
