"""The DuckDB file users query: built fresh by one writer and renamed into place.

Readers never see a lock or a half-built database: they keep reading the file they opened.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import duckdb
import pandas as pd

from deconflow.protocol import FAMILIES, family_file


def _empty_family(family: str) -> pd.DataFrame:
    cols = ["run_id", *FAMILIES[family]]
    df = pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    return df.astype({"run_id": "object", "step": "int64"})


def build_database(db_path: Path, runs: dict[str, Path], tables: dict[str, pd.DataFrame]) -> dict:
    """Write a fresh DuckDB file with every table and rename it over ``db_path``."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f".{db_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    counts: dict[str, int] = {}
    con = duckdb.connect(str(tmp))
    try:
        for family in FAMILIES:
            files = [
                str(d / family_file(family))
                for d in runs.values()
                if (d / family_file(family)).exists()
            ]
            if files:
                con.execute(
                    f"CREATE TABLE {family} AS SELECT * FROM read_parquet(?, union_by_name=true) "
                    "ORDER BY run_id, step",
                    [files],
                )
            else:
                con.register("_empty", _empty_family(family))
                con.execute(f"CREATE TABLE {family} AS SELECT * FROM _empty")
                con.unregister("_empty")
        for name, df in tables.items():
            con.register("_df", df)
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM _df")
            con.unregister("_df")
        for name in [*FAMILIES, *tables]:
            counts[name] = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, db_path)
    return counts
