"""A lab shares the sweep: what the pipeline writes follows the umask (a teammate, another
Unix user, reads every table and the report), and the data folder moves (every table
answers from the new place; no view names the old one)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from deconflow.status import run_sql
from tests.sharing_pipeline import write_sweep

REPO = Path(__file__).resolve().parents[1]
VIEWS = ("batch_metrics", "val_metrics", "curvature_metrics", "noise_metrics")


def _write_under_umask(root: Path, umask: int, n_cells: int = 3) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "sharing_pipeline.py"), str(root), str(n_cells)],
        check=True,
        env=env,
        preexec_fn=lambda: os.umask(umask),
        timeout=120,
    )


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


@pytest.fixture
def shared_tmp():
    """A folder other users can traverse (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="deconflow-share-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_everything_written_follows_the_umask(shared_tmp, umask, file_mode, dir_mode):
    root = shared_tmp / "data"
    _write_under_umask(root, umask)
    modes = _modes(root)
    assert len(modes) > 40
    # The user-facing DuckDB file is read-only on purpose (steers users to read-only
    # opens); readable as the umask says.
    assert modes.pop("deconflow.duckdb") == 0o444 & ~umask
    wrong = {
        p: oct(m) for p, m in modes.items() if m != (dir_mode if (root / p).is_dir() else file_mode)
    }
    assert wrong == {}


def _cli_for_others(base: Path) -> Path:
    """The duckdb CLI binary where another user can run it (the pip package lives under
    /root here)."""
    cli_pkg = pytest.importorskip("duckdb_cli")
    src = Path(cli_pkg.__file__).parent / "duckdb"
    if not src.exists():
        pytest.skip("duckdb-cli has no binary")
    dst = base / "bin" / "duckdb"
    dst.parent.mkdir(mode=0o755)
    shutil.copy(src, dst)
    os.chmod(dst, 0o755)
    return dst


def test_another_user_reads_every_table_and_the_report(shared_tmp):
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root and runuser to act as another user")
    root = shared_tmp / "data"
    _write_under_umask(root, 0o022)
    cli = _cli_for_others(shared_tmp)
    db = root / "deconflow.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    names = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
    names += [
        r[0]
        for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    ]
    con.close()
    assert set(VIEWS) <= set(names) and "run_fits" in names
    counts = " UNION ALL ".join(f"SELECT '{n}', count(*) FROM {n}" for n in names)
    files = (
        f"SELECT 'runs parquet', count(*) FROM read_parquet('{root}/runs/*/*.parquet', "
        f"union_by_name=true) UNION ALL SELECT 'tables', count(*) FROM "
        f"read_parquet('{root}/tables/*.parquet') UNION ALL SELECT 'export', count(*) "
        f"FROM read_csv('{root}/export/run_fits.csv')"
    )

    def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "nobody", "--", *cmd],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
        )

    r = as_nobody(
        str(cli), "-readonly", "-csv", "-cmd", f"SET file_search_path='{root}'", str(db), "-c",
        f"{counts} UNION ALL {files}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = dict(line.rsplit(",", 1) for line in r.stdout.splitlines()[1:])
    assert set(got) == {*names, "runs parquet", "tables", "export"}
    assert int(got["batch_metrics"]) > 0 and int(got["run_fits"]) == 3
    r = as_nobody("cat", str(root / "report" / "index.html"))
    assert r.returncode == 0 and "sharing test" in r.stdout, r.stderr
    r = as_nobody("cat", str(root / "export" / "metadata.json"))
    assert r.returncode == 0, r.stderr


def _view_sql(db: Path) -> str:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return "\n".join(r[0] for r in con.execute("SELECT sql FROM duckdb_views()").fetchall())
    finally:
        con.close()


def _cells(monkeypatch, data: Path) -> dict[str, int]:
    monkeypatch.setenv("DECONFLOW_DATA", str(data))
    monkeypatch.delenv("DECONFLOW_DB", raising=False)
    q = " UNION ALL ".join(
        f"SELECT '{v}' AS v, count(DISTINCT run_id) AS n FROM {v}" for v in VIEWS
    )
    out = dict(run_sql(q + " UNION ALL SELECT 'run_fits', count(*) FROM run_fits").values.tolist())
    return {k: int(v) for k, v in out.items()}


def test_a_copied_folder_answers_from_its_new_place(tmp_path, monkeypatch):
    old = tmp_path / "old" / "data"
    write_sweep(old, 3)
    new = tmp_path / "elsewhere" / "sweep-copy"
    shutil.copytree(old, new)
    # The old folder stays, and changes (a fourth cell): a stale read would see 4.
    shutil.rmtree(old)
    write_sweep(old, 4)
    assert _cells(monkeypatch, old)["batch_metrics"] == 4
    got = _cells(monkeypatch, new)
    assert got == dict.fromkeys([*VIEWS, "run_fits"], 3)
    for db in (new / "deconflow.duckdb", *(new / "deconflow.warehouse" / "snapshots").iterdir()):
        sql = _view_sql(db)
        assert "read_parquet" in sql and str(old) not in sql and str(tmp_path) not in sql
    # Now the old folder is gone: the copy still answers, every view.
    shutil.rmtree(old)
    assert _cells(monkeypatch, new) == got


def test_a_moved_folder_answers_and_publishes_in_its_new_place(tmp_path, monkeypatch):
    old = tmp_path / "a" / "data"
    runs = write_sweep(old, 3)
    new = tmp_path / "b" / "data"
    new.parent.mkdir()
    os.rename(old, new)
    assert _cells(monkeypatch, new)["val_metrics"] == 3
    # The next publication in the new place builds on the moved warehouse.
    from deconflow.warehouse.database import publish_database

    moved = {k: new / "runs" / k for k in runs}
    fits = pd.read_parquet(new / "tables" / "run_fits.parquet")
    report = publish_database(new / "deconflow.duckdb", moved, {"run_fits": fits})
    assert report["counts"]["batch_metrics"] > 0
    assert _cells(monkeypatch, new)["batch_metrics"] == 3
    assert str(old) not in _view_sql(new / "deconflow.duckdb")


def test_the_duckdb_cli_reads_the_file_in_the_data_folder(tmp_path):
    """The documented open (`cd data && duckdb -readonly deconflow.duckdb`): the CLI that
    setup installs reads the storage version deconflow writes, views included."""
    exe = shutil.which("duckdb")
    if exe is None:
        pytest.skip("no duckdb CLI (scripts/setup.sh installs duckdb-cli)")
    data = tmp_path / "data"
    write_sweep(data, 2)
    r = subprocess.run(
        [exe, "-readonly", "-csv", "deconflow.duckdb", "-c",
         "SELECT count(DISTINCT run_id) AS n FROM batch_metrics"],
        cwd=data, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["n", "2"]
