"""Per-run metric families, buffered in memory and written as Parquet atomically.

One file per family (``batch_metrics.parquet``, ``val_metrics.parquet``, ...). Each
flush rewrites the whole file through a rename, so readers never see a half file, and
a resumed run reloads it and drops rows past its checkpoint: no row is duplicated.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from deconflow.parquet_io import write_parquet
from deconflow.protocol import FAMILIES, family_file


class MetricLog:
    """Rows of every metric family for one run, keyed by ``run_id`` and ``step``."""

    def __init__(self, folder: Path, run_id: str) -> None:
        self.folder = Path(folder)
        self.run_id = run_id
        self.rows: dict[str, list[dict]] = {name: [] for name in FAMILIES}
        self._written: dict[str, int] = {}

    def add(self, family: str, **row) -> None:
        self.rows[family].append(row)

    def extend(self, family: str, columns: dict[str, list]) -> None:
        n = len(next(iter(columns.values())))
        cols = FAMILIES[family]
        self.rows[family].extend({c: columns[c][i] for c in cols} for i in range(n))

    def frame(self, family: str) -> pd.DataFrame:
        df = pd.DataFrame(self.rows[family], columns=FAMILIES[family])
        df.insert(0, "run_id", self.run_id)
        types = {c: "float64" for c in FAMILIES[family]}
        return df.astype({**types, "step": "int64", "run_id": "object"})

    def flush(self) -> None:
        for family in FAMILIES:
            if (
                self._written.get(family) == len(self.rows[family])
                and (self.folder / family_file(family)).exists()
            ):
                continue
            write_parquet(self.folder / family_file(family), self.frame(family))
            self._written[family] = len(self.rows[family])

    def load(self, upto_step: int) -> None:
        """Reload what an earlier attempt wrote, keeping rows up to its checkpoint."""
        for family in FAMILIES:
            path = self.folder / family_file(family)
            if path.exists():
                df = pd.read_parquet(path)
                df = df[df["step"] <= upto_step]
                self.rows[family] = df[FAMILIES[family]].to_dict("records")
            else:
                self.rows[family] = []
        self._written = {}

    def truncate_after(self, step: int) -> None:
        for family in FAMILIES:
            self.rows[family] = [r for r in self.rows[family] if r["step"] <= step]
