"""Cell keys and partition keys: the one owner of every key <-> cell conversion.

A cell key looks like ``base__lr0.1_wd0.0001_s0``: the variant, a double underscore, then
the hyper-parameter part (the ``hp`` partition dimension). Both parts use only
``[A-Za-z0-9_.-]`` so the key is safe in a file path, a SLURM job name and a Dagster
partition key. Numbers are written in their shortest positional form, so the key of a cell
never changes when other values are added to the grid. The Dagster multi-partition key of a
cell is ``hp|variant`` (Dagster orders the dimensions by name).

No Dagster, no torch: the training process parses keys too. ``partitions.py`` wraps these
in Dagster's ``MultiPartitionKey``; ``sweep.Cell`` builds its key here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from deconflow.sweep import Cell

KEY_SEP = "__"  # variant__hp
PARTITION_SEP = "|"  # hp|variant (Dagster's multi-partition key string)
VARIANT_DIM, HP_DIM = "variant", "hp"
_PART_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_HP_RE = re.compile(r"^lr(?P<lr>[0-9.]+)_wd(?P<wd>[0-9.]+)_s(?P<seed>[0-9]+)$")


class GridError(ValueError):
    """Bad grid file, cell value or cell key; the message is one line for the user."""


def format_number(x: float) -> str:
    """Shortest positional form of a float: 0.0001, 0.1, 2 (never 1e-04)."""
    if not np.isfinite(x):
        raise GridError(f"number must be finite, got {x!r}")
    return np.format_float_positional(float(x), trim="-")


# --- cell <-> cell key --------------------------------------------------------------------
def hp_key(lr: float, weight_decay: float, seed: int) -> str:
    """The hyper-parameter part of a cell key (the ``hp`` partition dimension)."""
    return f"lr{format_number(lr)}_wd{format_number(weight_decay)}_s{seed}"


def cell_key(variant: str, hp: str) -> str:
    return f"{variant}{KEY_SEP}{hp}"


def parse_hp(hp: str) -> tuple[float, float, int]:
    m = _HP_RE.match(hp)
    if not m:
        raise GridError(f"malformed hyper-parameter part {hp!r}; expected like 'lr0.1_wd0.0001_s0'")
    try:
        return float(m["lr"]), float(m["wd"]), int(m["seed"])
    except ValueError as e:
        raise GridError(f"malformed hyper-parameter part {hp!r}: {e}") from None


def parse_key(key: str) -> Cell:
    """The cell of a cell key (inverse of ``Cell.key``); rejects anything that would not
    round-trip."""
    from deconflow.sweep import Cell  # Cell builds its key here: imported when first parsed

    if not isinstance(key, str) or KEY_SEP not in key:
        raise GridError(f"malformed cell key {key!r}; expected like 'base__lr0.1_wd0.0001_s0'")
    variant, hp = key.split(KEY_SEP, 1)
    for part in (variant, hp):
        if not _PART_RE.match(part):
            raise GridError(f"malformed cell key {key!r}: only [A-Za-z0-9_.-] allowed in parts")
    lr, wd, seed = parse_hp(hp)
    cell = Cell(variant, lr, wd, seed)
    if cell.key != key:
        raise GridError(f"malformed cell key {key!r}; its canonical form is {cell.key!r}")
    return cell


# --- cell <-> partition key ---------------------------------------------------------------
def partition_key_str(cell: Cell) -> str:
    """The string form of a cell's multi-partition key (``hp|variant``, Dagster's order)."""
    return f"{cell.hp}{PARTITION_SEP}{cell.variant}"


def partition_dims(cell: Cell) -> dict[str, str]:
    """A cell's partition key by dimension (what ``MultiPartitionKey`` takes)."""
    return {VARIANT_DIM: cell.variant, HP_DIM: cell.hp}


def cell_of_dims(dims: dict[str, str]) -> Cell:
    return parse_key(cell_key(dims[VARIANT_DIM], dims[HP_DIM]))


def cell_of_partition(key: str) -> Cell:
    """The cell of a partition key string ``hp|variant``; GridError if it names none."""
    hp, _, variant = str(key).partition(PARTITION_SEP)
    return cell_of_dims({HP_DIM: hp, VARIANT_DIM: variant})


def cell_key_of_partition(key: str | None) -> str | None:
    """The cell key of a partition key string; None if it names no cell."""
    if not key or PARTITION_SEP not in key:
        return None
    try:
        return cell_of_partition(key).key
    except ValueError:
        return None


def partition_of_cell_key(key: str) -> str:
    """The partition key string of a cell key (GridError if malformed)."""
    return partition_key_str(parse_key(key))
