"""The export for the next stage of the research: run_fits CSV, metadata, time series.

- ``run_fits.csv``: one row per run, floats in positional notation (never scientific);
  a missing value (e.g. no power-law fit for a run that never burns in) is an empty field.
- ``timeseries/<run>.parquet``: the run's batch metrics, one row per step, with its
  validation metrics joined on the step; on steps without a validation point the
  validation columns are null (Parquet null, not NaN). ``timeseries/.sources.json`` records
  which published files each was built from, so a refresh rewrites only changed runs.
- ``metadata.json``: row count, date, every column with its type, nullability and meaning,
  how missing values are written, and the time-series columns and types.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd

from deconflow.atomic import atomic_write_bytes, atomic_write_json
from deconflow.datadict import FIT_COLUMN_DOCS
from deconflow.parquet_io import write_parquet
from deconflow.protocol import FAMILIES, family_file

CSV_MISSING = "empty field (nothing between the commas)"
CSV_FLOATS = "positional decimal notation with up to 12 digits after the point, never 1e-05"
BATCH, VAL = "batch_metrics", "val_metrics"
VAL_COLUMNS = [c for c in FAMILIES[VAL] if c not in ("step", "epoch")]
TIMESERIES_COLUMNS = ["run_id", *FAMILIES[BATCH], *VAL_COLUMNS]


def _portable_type(dtype) -> str:
    """A dtype as a language-neutral name: string, int64, float64 or bool."""
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int64"
    if pd.api.types.is_float_dtype(dtype):
        return "float64"
    return "string"


def _positional(x) -> str:
    if x is None or x is pd.NA or (isinstance(x, float | np.floating) and not np.isfinite(x)):
        return ""
    if isinstance(x, bool | np.bool_):
        return "true" if x else "false"
    if isinstance(x, float | np.floating):
        return np.format_float_positional(float(x), trim="-", precision=12)
    return str(x)


def timeseries_frame(batch: pd.DataFrame, val: pd.DataFrame) -> pd.DataFrame:
    """Batch rows with the validation metrics of their step; typed, val columns null
    where the step has no validation point (a NaN that was logged stays NaN)."""
    batch = batch.sort_values("step").reset_index(drop=True)
    val = val.set_index("step")[VAL_COLUMNS]
    has_val = batch["step"].isin(val.index).to_numpy()
    out = pd.DataFrame({"run_id": batch["run_id"].astype("string")})
    out["step"] = batch["step"].astype("int64")
    for c in FAMILIES[BATCH][1:]:
        out[c] = batch[c].astype("float64")
    for c in VAL_COLUMNS:
        values = val[c].reindex(batch["step"]).to_numpy(dtype=float)
        out[c] = pd.arrays.FloatingArray(values, ~has_val)
    return out[TIMESERIES_COLUMNS]


def _timeseries_types() -> list[dict]:
    cols = []
    for c in TIMESERIES_COLUMNS:
        typ = "string" if c == "run_id" else ("int64" if c == "step" else "float64")
        cols.append({"name": c, "type": typ, "nullable": c in VAL_COLUMNS})
    return cols


SOURCES_INDEX = ".sources.json"  # per time-series file: the published files it was built from


def _fingerprint(sources: tuple[Path, ...]) -> list[list[int]]:
    """What identifies a published file's content: its size and mtime, which publishing keeps
    from the training's own write (a rerun writes new files), and its inode."""
    return [[st.st_ino, st.st_size, st.st_mtime_ns] for st in (src.stat() for src in sources)]


def export_dataset(fits: pd.DataFrame, runs: dict[str, Path], out: Path) -> dict:
    """The tier-4 export: run_fits CSV (no scientific notation), metadata, time series.

    A run's time series is rewritten only when its published metrics changed, so a refresh
    after one cell landed costs one file, not one per run of the sweep."""
    out.mkdir(parents=True, exist_ok=True)
    text = fits.map(_positional).to_csv(index=False)
    atomic_write_bytes(out / "run_fits.csv", lambda f: f.write(text.encode()))
    ts_dir = out / "timeseries"
    ts_dir.mkdir(exist_ok=True)
    try:
        built = json.loads((ts_dir / SOURCES_INDEX).read_text())
    except (OSError, ValueError):
        built = {}
    index, written = {}, 0
    for key, d in runs.items():
        target = ts_dir / f"{key}.parquet"
        sources = (d / family_file(BATCH), d / family_file(VAL))
        index[key] = _fingerprint(sources)
        if built.get(key) == index[key] and target.exists():
            continue
        batch, val = (pd.read_parquet(src) for src in sources)
        write_parquet(target, timeseries_frame(batch, val))
        written += 1
    for stale in set(p.stem for p in ts_dir.glob("*.parquet")) - set(runs):
        (ts_dir / f"{stale}.parquet").unlink()
    atomic_write_json(ts_dir / SOURCES_INDEX, index)
    meta = {
        "dataset": "loss-slope sweep run_fits",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "row_count": len(fits),
        "columns": [
            {
                "name": c,
                "type": _portable_type(t),
                "nullable": str(t) in ("Float64", "Int64", "string") or bool(fits[c].isna().any()),
                "description": FIT_COLUMN_DOCS.get(c, ("", ""))[1],
            }
            for c, t in fits.dtypes.items()
        ],
        "csv": {
            "file": "run_fits.csv",
            "missing_values": CSV_MISSING,
            "floats": CSV_FLOATS,
            "booleans": "true / false",
        },
        "timeseries": {
            "folder": "timeseries",
            "files": len(runs),
            "rewritten_this_refresh": written,
            "file_name": "<run_id>.parquet",
            "format": "parquet",
            "rows": "one per optimizer step (batch metrics)",
            "columns": _timeseries_types(),
            "missing_values": "Parquet null: the validation columns on steps without a "
            "validation point. NaN or inf in a loss is a logged value (a diverged run's "
            "last step), not a missing one.",
        },
    }
    atomic_write_json(out / "metadata.json", meta)
    return meta
