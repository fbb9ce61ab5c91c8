"""The export for the next stage of the research: run_fits CSV, metadata, time series."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd

from deconflow.atomic import atomic_write_bytes, atomic_write_json
from deconflow.parquet_io import write_parquet
from deconflow.protocol import family_file


def _positional(x) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return ""
    if isinstance(x, float | np.floating):
        return np.format_float_positional(float(x), trim="-", precision=12)
    return str(x)


def export_dataset(fits: pd.DataFrame, runs: dict[str, Path], out: Path) -> dict:
    """The tier-4 export: run_fits CSV (no scientific notation), metadata, time series."""
    out.mkdir(parents=True, exist_ok=True)
    text = fits.map(_positional).to_csv(index=False)
    atomic_write_bytes(out / "run_fits.csv", lambda f: f.write(text.encode()))
    ts_dir = out / "timeseries"
    ts_dir.mkdir(exist_ok=True)
    for key, d in runs.items():
        batch = pd.read_parquet(d / family_file("batch_metrics"))
        val = pd.read_parquet(d / family_file("val_metrics")).drop(columns=["run_id", "epoch"])
        write_parquet(ts_dir / f"{key}.parquet", batch.merge(val, on="step", how="left"))
    for stale in set(p.stem for p in ts_dir.glob("*.parquet")) - set(runs):
        (ts_dir / f"{stale}.parquet").unlink()
    meta = {
        "dataset": "loss-slope sweep run_fits",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "row_count": len(fits),
        "columns": [{"name": c, "type": str(t)} for c, t in fits.dtypes.items()],
        "timeseries": {
            "folder": "timeseries",
            "files": len(runs),
            "format": "parquet",
            "columns": "batch metrics per step, validation metrics joined on step",
        },
    }
    atomic_write_json(out / "metadata.json", meta)
    return meta
