"""Several partitions finishing at once, and a user querying DuckDB all the while."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import dagster as dg
import pytest

from deconflow.partitions import partition_key
from deconflow.status import run_sql
from deconflow.sweep import Cell
from tests.helpers import asset, data_path, downstream, make_defs

pytestmark = pytest.mark.slow  # materializes concurrent trainings

CELLS = [Cell(v, 0.1, 1e-3, 5) for v in ("base", "bn_off", "narrow", "adamw")]
EPOCHS = 2  # of 11 steps: what matters here is four writers landing at once


def _train_and_publish(key: str) -> bool:
    """One worker: a partition, then every downstream asset, i.e. a DuckDB writer."""
    from deconflow.sweep import parse_key

    defs = make_defs(epochs=EPOCHS)
    with dg.DagsterInstance.get() as instance:
        ok = dg.materialize(
            [asset(defs, "training_run")],
            partition_key=partition_key(parse_key(key)),
            instance=instance,
        ).success
        return (
            ok
            and dg.materialize(
                downstream(defs, through="sweep_db"), instance=instance, raise_on_error=False
            ).success
        )


def test_concurrent_partitions_and_readers_never_hit_a_lock(sweep_env):
    defs = make_defs(epochs=EPOCHS)
    instance = dg.DagsterInstance.get()
    first = downstream(defs, through="sweep_db")  # the writer; figures and report are not
    assert dg.materialize(first, instance=instance, raise_on_error=False).success
    assert data_path("deconflow.duckdb").exists()

    errors: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                run_sql("SELECT count(*) FROM batch_metrics JOIN runs USING (run_id)")
                reads += 1
            except Exception as e:  # noqa: BLE001 - any error is the failure we test for
                errors.append(repr(e))
            time.sleep(0.25)  # a user re-running a query; tighter loops only burn the CPU

    t = threading.Thread(target=reader)
    t.start()
    try:
        with ProcessPoolExecutor(3, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_train_and_publish, [c.key for c in CELLS]))
    finally:
        stop.set()
        t.join()
    assert all(results)
    assert errors == []
    assert reads > 20
    counts = run_sql("SELECT run_id, count(*) AS n FROM batch_metrics GROUP BY 1")
    assert dict(zip(counts["run_id"], counts["n"], strict=True)) == {
        c.key: 11 * EPOCHS for c in CELLS
    }
