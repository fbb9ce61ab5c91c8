"""What a ``training_run`` materialization shows beyond the run's numbers: its learning curve
(drawn by the training process; read here as bytes, no matplotlib in this process) and one
meaning per name (``resumes``: checkpoint resumes inside this Dagster run; the Dagster runs of
a cell are the ``dagster_runs`` column of the ``runs`` table)."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg

from deconflow.protocol import LEARNING_CURVE

# Above this the picture is linked by path only: event-log rows stay small.
MAX_INLINE_BYTES = 200_000


def learning_curve_metadata(published: Path) -> dict[str, dg.MetadataValue]:
    """``learning_curve`` (an inline image) and ``learning_curve_path``; {} if not drawn."""
    path = Path(published) / LEARNING_CURVE
    if not path.exists():
        return {}
    out: dict[str, dg.MetadataValue] = {"learning_curve_path": dg.MetadataValue.path(str(path))}
    png = path.read_bytes()
    if len(png) <= MAX_INLINE_BYTES:
        b64 = base64.b64encode(png).decode()
        out["learning_curve"] = dg.MetadataValue.md(
            f"![learning curve of {path.parent.name}](data:image/png;base64,{b64})"
        )
    return out


def public_run_metadata(meta: dict) -> dict:
    """The summary's ``attempts`` (process starts) shown as ``resumes`` (starts - 1)."""
    meta = dict(meta)
    if "attempts" in meta:
        starts = meta.pop("attempts")
        value = getattr(starts, "value", starts)
        if isinstance(value, int | float):
            meta["resumes"] = max(0, int(value) - 1)
    return meta
