"""A real PostgreSQL server on localhost for the Dagster instance, for development and CI.

``deconflow postgres up|down|status|env`` (or ``python -m deconflow_dev.postgres ...``) runs
Debian's PostgreSQL (``/usr/lib/postgresql/<version>/bin``) with its data folder, socket and log
under one state directory and on a non-default port, so it never touches a system PostgreSQL.
As root the server runs as the ``postgres`` system user (PostgreSQL refuses root). Clients only
need the URL that :func:`up` returns (``DECONFLOW_PG_URL``).

A lab uses its own server instead: set ``DECONFLOW_PG_URL`` to it (see the README).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deconflow_dev import ports

PORT = int(os.environ.get("DECONFLOW_PG_PORT") or ports.port("postgres"))
DB = "deconflow"


@dataclass(frozen=True)
class PgInfo:
    state_dir: Path
    port: int
    url: str


def default_state_dir() -> Path:
    """``data/postgres`` of this checkout, unless the server's user (postgres) cannot reach
    it (a checkout under a private folder, e.g. ``mktemp -d``): then a folder of its own
    under /var/tmp, named after the checkout."""
    env = os.environ.get("DECONFLOW_PG_DIR")
    if env:
        return Path(env).resolve()
    here = Path("data").resolve() / "postgres"
    ancestors = [a for a in here.parents if a.exists()]
    if all(a.stat().st_mode & 0o001 for a in ancestors):
        return here
    tag = hashlib.sha1(str(here).encode()).hexdigest()[:10]
    return Path("/var/tmp") / f"deconflow-postgres-{tag}"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if not path:
        raise SystemExit(
            f"postgres: {name} not found; install Debian's postgresql package "
            "(bash scripts/setup.sh --slurm does)"
        )
    return path


def _as_server_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres system user."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def _owner() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(_as_server_user(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise SystemExit(f"postgres: {argv[0]} failed: {msg[-1] if msg else proc.returncode}")
    return proc


def port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def info(state_dir: Path | None = None, port: int = PORT) -> PgInfo:
    state = Path(state_dir or default_state_dir()).resolve()
    return PgInfo(state, port, f"postgresql://postgres@localhost:{port}/{DB}")


def _running(state: Path) -> bool:
    pgdata = state / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        return False
    return _run([_bin("pg_ctl"), "-D", str(pgdata), "status"], check=False).returncode == 0


def up(state_dir: Path | None = None, port: int = PORT) -> PgInfo:
    """Initialise (once) and start the server, create the database; idempotent. Callers in
    parallel (test workers) wait for one another."""
    with ports.service_lock("postgres"):
        return _up(state_dir, port)


def _up(state_dir: Path | None, port: int) -> PgInfo:
    pi = info(state_dir, port)
    state, pgdata, sock = pi.state_dir, pi.state_dir / "pgdata", pi.state_dir / "run"
    state.mkdir(parents=True, exist_ok=True)
    owner = _owner()
    for d in (state, sock):
        d.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(d, *owner)
    if not (pgdata / "PG_VERSION").exists():
        _run([_bin("initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    if not _running(state):
        if port_in_use(port):
            raise SystemExit(
                f"postgres: port {port} is taken by another server; set DECONFLOW_PG_PORT"
            )
        opts = f"-p {port} -k {sock} -c listen_addresses=localhost -c max_connections=300"
        _run(
            [
                _bin("pg_ctl"),
                "-D",
                str(pgdata),
                "-l",
                str(state / "postgres.log"),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = [_bin("pg_isready"), "-h", "localhost", "-p", str(port), "-U", "postgres"]
        if _run(ready, check=False).returncode == 0:
            break
        time.sleep(0.3)
    psql = [_bin("psql"), "-h", "localhost", "-p", str(port), "-U", "postgres", "-tAc"]
    exists = _run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"]).stdout.strip()
    if exists != "1":
        _run([*psql, f"CREATE DATABASE {DB}"])
    return pi


def down(state_dir: Path | None = None) -> None:
    pi = info(state_dir)
    if _running(pi.state_dir):
        _run([_bin("pg_ctl"), "-D", str(pi.state_dir / "pgdata"), "-m", "fast", "-w", "stop"])


def reset_database(pi: PgInfo, name: str) -> str:
    """A fresh, empty database ``name`` on the server (for tests); returns its URL."""
    psql = [_bin("psql"), "-h", "localhost", "-p", str(pi.port), "-U", "postgres", "-tAc"]
    _run([*psql, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])
    _run([*psql, f"CREATE DATABASE {name}"])
    return f"postgresql://postgres@localhost:{pi.port}/{name}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deconflow postgres", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--state-dir", default=None, help="default data/postgres")
    args = p.parse_args(argv)
    state = Path(args.state_dir) if args.state_dir else None
    if args.action == "up":
        pi = up(state)
        print(f"postgres up on port {pi.port}; export DECONFLOW_PG_URL={pi.url}")
    elif args.action == "down":
        down(state)
        print("postgres stopped")
    elif args.action == "status":
        pi = info(state)
        print(f"postgres {'running' if _running(pi.state_dir) else 'stopped'} ({pi.state_dir})")
    else:
        print(f"export DECONFLOW_PG_URL={info(state).url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
