"""Where things live. Everything defaults to ``data/`` under the working directory.

``DECONFLOW_DATA`` moves the whole data folder; ``DECONFLOW_DB`` just the DuckDB file.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("DECONFLOW_DATA", "data")).resolve()


def db_path() -> Path:
    env = os.environ.get("DECONFLOW_DB")
    return Path(env).resolve() if env else data_root() / "deconflow.duckdb"


def runs_dir(root: Path | None = None) -> Path:
    """Published runs: one folder per cell key, replaced whole when a cell is re-run."""
    return (root or data_root()) / "runs"


def work_dir(root: Path | None = None) -> Path:
    """Attempts in progress: checkpoints, partial metrics, logs, Pipes files."""
    return (root or data_root()) / "work"


def tables_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "tables"


def export_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "export"
