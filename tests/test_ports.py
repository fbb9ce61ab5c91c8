"""Two checkouts on one machine run their dev services side by side: each has a port block
of its own (``deconflow_dev.ports``), and each starts its own PostgreSQL and SLURM."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deconflow_dev import ports

REPO = Path(__file__).resolve().parents[1]


def base_of(checkout: Path) -> int:
    """The port base a checkout at ``checkout`` computes for itself (in a fresh process)."""
    out = subprocess.run(
        [sys.executable, "-c", "from deconflow_dev import ports; print(ports.port_base())"],
        cwd=checkout,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def copy_checkout(dest: Path) -> Path:
    shutil.copytree(REPO / "deconflow_dev", dest / "deconflow_dev")
    return dest


def test_two_checkouts_get_disjoint_port_blocks(tmp_path):
    a = base_of(copy_checkout(tmp_path / "a"))
    b = base_of(copy_checkout(tmp_path / "b"))
    assert a != b
    assert abs(a - b) >= ports.WIDTH  # blocks never overlap
    assert base_of(REPO) == ports.port_base()


def test_every_service_port_is_in_the_block(monkeypatch):
    monkeypatch.setenv(ports.BASE_VAR, "23000")
    assert [ports.port(n) for n in ports.NAMES] == [23000, 23001, 23002, 23003, 23004]


@pytest.mark.parametrize("bad", ["abc", "80", "70000", "-1"])
def test_a_bad_port_base_is_one_line_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv(ports.BASE_VAR, bad)
    with pytest.raises(SystemExit) as err:
        ports.port_base()
    msg = str(err.value)
    assert ports.BASE_VAR in msg and "\n" not in msg


@pytest.mark.slow
def test_two_postgres_servers_of_two_checkouts_run_at_once(tmp_path):
    from deconflow_dev import postgres

    if not shutil.which("runuser") or not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.fail("Debian's postgresql is not installed (bash scripts/setup.sh --slurm)")
    blocks = [ports.port_base(tmp_path / name) for name in ("one", "two")]
    servers = []
    try:
        for base in blocks:
            state = Path("/var/tmp") / f"deconflow-pgtest-{base}"
            servers.append(postgres.up(state, base + ports.NAMES.index("postgres")))
        urls = {s.url for s in servers}
        assert len(urls) == 2
        for s in servers:
            psql = [postgres._bin("psql"), "-h", "localhost", "-p", str(s.port), "-U", "postgres"]
            out = subprocess.run(
                [*psql, "-tAc", "SELECT 1"], capture_output=True, text=True, check=True
            )
            assert out.stdout.strip() == "1"
    finally:
        for s in servers:
            postgres.down(s.state_dir)
            shutil.rmtree(s.state_dir, ignore_errors=True)
