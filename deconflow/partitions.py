"""The grid as Dagster partitions: ``variant`` x ``hp``.

Dagster's multi-partitions allow two dimensions, so lr, weight decay and seed share the
``hp`` dimension (``lr0.1_wd0.0001_s0``). That keeps whole variants selectable in the UI
(one click backfills ``bn_off``) and keeps every key stable when the grid grows.
"""

from __future__ import annotations

import dagster as dg

from deconflow.sweep import Cell, Grid, parse_key


def partitions_def(grid: Grid) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {
            "variant": dg.StaticPartitionsDefinition(sorted(grid.variants)),
            "hp": dg.StaticPartitionsDefinition(grid.hps),
        }
    )


def partition_key(cell: Cell) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"variant": cell.variant, "hp": cell.hp})


def cell_for(key: str | dg.MultiPartitionKey) -> Cell:
    """The cell of a partition key (``MultiPartitionKey`` or its ``hp|variant`` string)."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
    else:
        hp, _, variant = str(key).partition("|")
        dims = {"hp": hp, "variant": variant}
    return parse_key(f"{dims['variant']}__{dims['hp']}")
