"""Per-run metric families: buffered in memory, appended to disk as Parquet part files.

While a run trains, every flush writes only the rows added since the last one, as one new
file ``<family>.parts/part-NNNNNN.parquet`` (atomic: temp file, fsync, rename), so a flush
costs O(new rows), not O(rows so far). When the run ends, :meth:`MetricLog.compact` writes
each family whole to ``<family>.parquet`` (one O(n) write per run) and removes the parts, so a
finished run folder, and everything published from it, has exactly one file per family.

:func:`read_family` is the one reader of a run folder's metrics, whatever state the folder is
in: the compacted file (if any) followed by the parts in write order, a step written twice
(a resumed run replays the steps after its checkpoint) kept from the newest write.
A resumed run reloads that view, drops rows past its checkpoint and rewrites it as the base
file, so no row is duplicated.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd

from deconflow.parquet_io import write_parquet
from deconflow.protocol import FAMILIES, METRIC_FILE_GLOB, family_file, family_parts_dir

_PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")


def _typed(df: pd.DataFrame, family: str) -> pd.DataFrame:
    types = {c: "float64" for c in FAMILIES[family]}
    return df.astype({**types, "step": "int64", "run_id": "object"})


def _parts(folder: Path, family: str) -> list[tuple[int, Path]]:
    d = Path(folder) / family_parts_dir(family)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _PART_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def has_family(folder: Path, family: str) -> bool:
    return (Path(folder) / family_file(family)).exists() or bool(_parts(folder, family))


def read_family(folder: Path, family: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A run folder's rows of ``family`` (columns ``run_id`` + FAMILIES[family]) by step.

    Reads ``<family>.parquet`` and then ``<family>.parts/part-*.parquet`` in write order; a
    step present twice is taken from the later file. A folder with neither gives no rows.
    """
    folder = Path(folder)
    want = columns
    if columns is not None and "step" not in columns:
        columns = ["step", *columns]
    base = folder / family_file(family)
    parts = _parts(folder, family)
    frames = []
    if base.exists():
        frames.append(pd.read_parquet(base, columns=columns))
    frames += [pd.read_parquet(p, columns=columns) for _, p in parts]
    if not frames:
        cols = want or ["run_id", *FAMILIES[family]]
        kinds = {"step": "int64", "run_id": "object"}
        return pd.DataFrame({c: pd.Series(dtype=kinds.get(c, "float64")) for c in cols})
    if len(frames) == 1:
        df = frames[0]
    else:
        df = pd.concat(frames, ignore_index=True)
        df = df.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
        df = df.reset_index(drop=True)
    return df[want] if want is not None else df


def _disk_full_is_one_line(path: Path):
    from deconflow.training.checkpoints import disk_full_is_one_line  # torch-side module

    return disk_full_is_one_line(path)


class MetricLog:
    """Rows of every metric family for one run, keyed by ``run_id`` and ``step``."""

    def __init__(self, folder: Path, run_id: str) -> None:
        self.folder = Path(folder)
        self.run_id = run_id
        self.rows: dict[str, list[dict]] = {name: [] for name in FAMILIES}
        self._written: dict[str, int] = {name: 0 for name in FAMILIES}
        self._next_part: dict[str, int] = {name: 0 for name in FAMILIES}

    def add(self, family: str, **row) -> None:
        self.rows[family].append(row)

    def extend(self, family: str, columns: dict[str, list]) -> None:
        n = len(next(iter(columns.values())))
        cols = FAMILIES[family]
        self.rows[family].extend({c: columns[c][i] for c in cols} for i in range(n))

    def frame(self, family: str, start: int = 0) -> pd.DataFrame:
        """Rows ``start:`` of ``family`` as a typed frame with ``run_id`` first."""
        df = pd.DataFrame(self.rows[family][start:], columns=FAMILIES[family])
        df.insert(0, "run_id", self.run_id)
        return _typed(df, family)

    def _write(self, path: Path, df: pd.DataFrame) -> None:
        with _disk_full_is_one_line(path):
            write_parquet(path, df)

    def flush(self) -> None:
        """Append the rows added since the last flush: one new part file per family."""
        for family in FAMILIES:
            start = self._written[family]
            if start >= len(self.rows[family]):
                continue
            k = self._next_part[family]
            path = self.folder / family_parts_dir(family) / f"part-{k:06d}.parquet"
            self._write(path, self.frame(family, start))
            self._written[family] = len(self.rows[family])
            self._next_part[family] = k + 1

    def compact(self) -> None:
        """Each family whole into ``<family>.parquet`` (also when empty); parts removed."""
        for family in FAMILIES:
            self._write(self.folder / family_file(family), self.frame(family))
            shutil.rmtree(self.folder / family_parts_dir(family), ignore_errors=True)
            self._written[family] = len(self.rows[family])
            self._next_part[family] = 0

    def clear(self) -> None:
        """Forget every metric file of the folder (a fresh start)."""
        for f in self.folder.glob(METRIC_FILE_GLOB):
            f.unlink()
        for family in FAMILIES:
            shutil.rmtree(self.folder / family_parts_dir(family), ignore_errors=True)
        self.rows = {name: [] for name in FAMILIES}
        self._written = {name: 0 for name in FAMILIES}
        self._next_part = {name: 0 for name in FAMILIES}

    def load(self, upto_step: int) -> None:
        """Reload what an earlier attempt wrote, keeping rows up to its checkpoint.

        A folder with parts, or with rows past the checkpoint, is rewritten once as the base
        file of the kept rows (then the parts are removed), so appending resumes from there.
        """
        for family in FAMILIES:
            had_parts = bool(_parts(self.folder, family))
            df = read_family(self.folder, family)
            kept = df[df["step"] <= upto_step]
            self.rows[family] = kept[FAMILIES[family]].to_dict("records")
            if had_parts or len(kept) != len(df):
                self._write(self.folder / family_file(family), self.frame(family))
                shutil.rmtree(self.folder / family_parts_dir(family), ignore_errors=True)
            self._written[family] = len(self.rows[family])
            self._next_part[family] = 0

    def truncate_after(self, step: int) -> None:
        for family in FAMILIES:
            self.rows[family] = [r for r in self.rows[family] if r["step"] <= step]
        # compact() rewrites every family whole: nothing on disk past `step` survives it
