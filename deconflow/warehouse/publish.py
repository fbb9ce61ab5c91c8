"""Publishing: a finished attempt's results replace its cell's published folder whole.

Runs land in ``data/runs/<cell key>/`` only through :func:`publish_run`, which copies into a
temp folder and renames it into place, so a re-run replaces a cell's rows (never duplicates
them) and a reader never sees a half-published cell.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from deconflow.protocol import RUN_FILES, SUMMARY
from deconflow.sweep import Grid, GridError, parse_key


def publish_run(work: Path, runs_root: Path) -> Path:
    """Copy a finished attempt's results into ``runs_root/<key>``, replacing the old ones."""
    final = runs_root / work.name
    tmp = runs_root / f".tmp-{work.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for name in RUN_FILES:
        if (work / name).exists():
            shutil.copy2(work / name, tmp / name)
    trash = None
    if final.exists():
        trash = runs_root / f".old-{work.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
    os.rename(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def published_runs(runs_root: Path, grid: Grid | None = None) -> dict[str, Path]:
    """Published run folders by cell key (only cells of ``grid`` when given)."""
    out: dict[str, Path] = {}
    if not runs_root.exists():
        return out
    for d in sorted(runs_root.iterdir()):
        if d.name.startswith(".") or not (d / SUMMARY).exists():
            continue
        try:
            cell = parse_key(d.name)
        except GridError:
            continue
        if grid is None or cell in grid:
            out[d.name] = d
    return out


def read_summary(run: Path) -> dict:
    return json.loads((run / SUMMARY).read_text())
