"""The sweep report: one self-contained, interactive HTML page (``data/report/index.html``).

- :mod:`.data` gathers what the page shows (verdicts, gates per variant, completeness,
  downsampled curves read straight from the published Parquet with DuckDB, seed bands per
  cell, H2 trends within strata) into one JSON-able dict;
- :mod:`.page` writes it into the page with the hand-written JavaScript and CSS in
  ``static/`` (no library, no network: inline SVG charts, tooltips naming runs, a sortable
  and filterable run table, a run panel with train/validation curves, fit and knee).

The analysis assets also keep their PNG pictures here (``save_figure``) for the Dagster UI.
"""

from __future__ import annotations

from pathlib import Path

from deconflow.atomic import atomic_write_bytes
from deconflow.report.page import build_report
from deconflow.settings import data_root

FIGURES = "figures"


def report_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "report"


def figure_path(name: str) -> Path:
    return report_dir() / FIGURES / f"{name}.png"


def save_figure(name: str, data: bytes) -> Path:
    path = figure_path(name)
    atomic_write_bytes(path, lambda f: f.write(data))
    return path


__all__ = ["FIGURES", "build_report", "figure_path", "report_dir", "save_figure"]
