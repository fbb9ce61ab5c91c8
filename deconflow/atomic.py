"""Atomic file writes: a temp file in the same folder, fsync, then rename into place, so a
process killed mid-write never leaves a truncated file for readers or for a resume."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
