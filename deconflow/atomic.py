"""Atomic file writes: a temp file in the same folder, fsync, then rename into place, so a
process killed mid-write never leaves a truncated file for readers or for a resume.

Files get the mode an ordinary ``open()`` would give them (0666 less the process umask:
0644 under umask 022, 0664 under 002), not mkstemp's private 0600, so teammates can read a
sweep. A caller that needs a private file (a secret) passes ``mode`` explicitly."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief race with other threads)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open(path, "w")`` would create: 0666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600; follow the umask instead
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write text atomically (with fsync); ``mode`` sets the file's permissions first."""

    def write(f) -> None:
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.write(text.encode())

    atomic_write_bytes(path, write)
