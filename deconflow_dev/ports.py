"""Ports of the development services, chosen per checkout so two checkouts test at once.

Every checkout gets a block of five loopback ports (slurmctld, slurmd, slurmdbd, MariaDB,
PostgreSQL) derived from its path, so a fresh clone's CI and a working tree's servers never
meet. ``DECONFLOW_PORT_BASE`` pins the block (e.g. to match firewall rules); the older
``DECONFLOW_PG_PORT`` still pins PostgreSQL alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

BASE_VAR = "DECONFLOW_PORT_BASE"
# 20000-39995: above the services' defaults (6817-6819, 3306, 5432) and below Linux's
# ephemeral range (32768+ by default is avoided by keeping blocks under 32000).
LOW, BLOCKS, WIDTH = 20000, 2400, 5
NAMES = ("slurmctld", "slurmd", "slurmdbd", "mariadb", "postgres")
CHECKOUT = Path(__file__).resolve().parents[1]


def port_base(checkout: Path = CHECKOUT) -> int:
    """The first port of this checkout's block (``DECONFLOW_PORT_BASE`` wins)."""
    raw = os.environ.get(BASE_VAR)
    if raw is not None:
        try:
            base = int(raw)
        except ValueError:
            raise SystemExit(f"{BASE_VAR}={raw!r}: not a whole number") from None
        if not 1024 <= base <= 65535 - WIDTH:
            raise SystemExit(f"{BASE_VAR}={raw!r}: must be in 1024..{65535 - WIDTH}")
        return base
    digest = hashlib.sha1(str(checkout).encode()).digest()
    return LOW + (int.from_bytes(digest[:4], "big") % BLOCKS) * WIDTH


def port(name: str, checkout: Path = CHECKOUT) -> int:
    """The port of one development service for this checkout."""
    return port_base(checkout) + NAMES.index(name)


@contextlib.contextmanager
def service_lock(name: str) -> Iterator[None]:
    """Hold this checkout's lock for starting or stopping one service: parallel test workers
    (pytest-xdist) and benchmarks start the dev cluster and PostgreSQL once, not racing."""
    path = Path(tempfile.gettempdir()) / f"deconflow-{name}-{port_base()}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
