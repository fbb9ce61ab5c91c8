"""From run folders to the DuckDB file users query (SPEC section 5), one job per module:

- :mod:`~deconflow.warehouse.publish`: a finished attempt replaces its published run folder;
- :mod:`~deconflow.warehouse.tables`: the runs, run_fits and completeness tables;
- :mod:`~deconflow.warehouse.database`: the DuckDB file, built by one writer;
- :mod:`~deconflow.warehouse.gates`: quality gates (GO / NO-GO) on that file;
- :mod:`~deconflow.warehouse.export`: the CSV + metadata + time-series export.
"""

from deconflow.warehouse.database import build_database
from deconflow.warehouse.export import export_dataset
from deconflow.warehouse.gates import quality_gates
from deconflow.warehouse.publish import publish_run, published_runs, read_summary
from deconflow.warehouse.tables import (
    FIT_COLUMNS,
    cell_status,
    completeness,
    run_fits,
    run_settings,
    runs_table,
)

__all__ = [
    "FIT_COLUMNS",
    "build_database",
    "cell_status",
    "completeness",
    "export_dataset",
    "publish_run",
    "published_runs",
    "quality_gates",
    "read_summary",
    "run_fits",
    "run_settings",
    "runs_table",
]
