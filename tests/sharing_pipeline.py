"""Write a small sweep's every kind of file the way the pipeline does (atomic writes, run
publication, the DuckDB warehouse, the export, the report), for the sharing tests:
``python3 tests/sharing_pipeline.py DATA_FOLDER [N_CELLS]`` (run under the umask to test)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_sweep(root: Path, n_cells: int = 3) -> dict[str, Path]:
    from deconflow.parquet_io import write_parquet
    from deconflow.report import build_report
    from deconflow.sweep import load_grid
    from deconflow.warehouse.database import publish_database
    from deconflow.warehouse.export import export_dataset
    from deconflow.warehouse.publish import publish_run
    from deconflow.warehouse.tables import run_fits
    from tests.synthetic_runs import write_run

    cells = load_grid().cells[:n_cells]
    runs = {}
    for c in cells:
        work = write_run(root / "work", c)  # the training's atomic Parquet + JSON writes
        runs[c.key] = publish_run(work, root / "runs")
    fits = run_fits(runs)  # the real per-run fits of the published runs
    write_parquet(root / "tables" / "run_fits.parquet", fits)
    publish_database(root / "deconflow.duckdb", runs, {"run_fits": fits})
    export_dataset(fits, runs, root / "export")
    build_report(
        root / "report" / "index.html",
        title="sharing test",
        coverage={},
        completeness=None,
        fits=fits,
        hypotheses=None,
        excluded=None,
        published=runs,
    )
    return runs


if __name__ == "__main__":
    write_sweep(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3)
