"""The grid as Dagster partitions: ``variant`` x ``hp`` (the key formats: deconflow.keys).

Dagster's multi-partitions allow two dimensions, so lr, weight decay and seed share the
``hp`` dimension (``lr0.1_wd0.0001_s0``). That keeps whole variants selectable in the UI
(one click backfills ``bn_off``) and keeps every key stable when the grid grows.
"""

from __future__ import annotations

import dagster as dg

from deconflow.keys import HP_DIM, VARIANT_DIM, cell_of_dims, cell_of_partition, partition_dims
from deconflow.sweep import Cell, Grid


def partitions_def(grid: Grid) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {
            VARIANT_DIM: dg.StaticPartitionsDefinition(sorted(grid.variants)),
            HP_DIM: dg.StaticPartitionsDefinition(grid.hps),
        }
    )


def partition_key(cell: Cell) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey(partition_dims(cell))


def cell_for(key: str | dg.MultiPartitionKey) -> Cell:
    """The cell of a partition key (``MultiPartitionKey`` or its ``hp|variant`` string)."""
    if isinstance(key, dg.MultiPartitionKey):
        return cell_of_dims(key.keys_by_dimension)
    return cell_of_partition(str(key))
