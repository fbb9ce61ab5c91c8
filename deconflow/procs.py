"""Process identity on this host: a pid plus its start time, so a reused pid is never
mistaken for the process that once had it. Used to re-attach to a local training process and
to find Dagster runs whose run worker is gone."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        if fields[0] == "Z":  # a zombie has ended; it only waits to be reaped
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def identity(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{start_time(pid)}"


def alive(ident: str) -> bool | None:
    """Whether the process named by :func:`identity` still runs; None if it is on another host
    (or the identity is malformed), where this host cannot tell."""
    host, _, rest = ident.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    now = start_time(int(pid))
    return now is not None and str(now) == start


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
