"""Parquet read/write shared by the training process and the warehouse (atomic writes)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deconflow.atomic import atomic_write_bytes


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    """Write ``df`` to ``path`` through a temp file and a rename: never a half file."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    atomic_write_bytes(path, lambda f: pq.write_table(table, f))


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pd.read_parquet(path, columns=columns)
