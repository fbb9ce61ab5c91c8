"""Materialize partitions as real Dagster runs from the command line (a CLI backfill), then
the analysis: what ``deconflow materialize`` and ``deconflow demo`` share."""

from __future__ import annotations

import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

from deconflow.protocol import FAILED, LAUNCHED_BY_TAG
from deconflow.sweep import Cell

# Dagster's event log stays complete in the instance; the console shows only warnings.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _quiet() -> None:
    import logging

    logging.getLogger("dagster").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=Warning, module="dagster")


def _materialize_cell(key: str) -> tuple[str, bool, str, float]:
    """Worker: one Dagster run materializing one partition on the persistent instance."""
    import dagster as dg

    from deconflow.definitions import defs
    from deconflow.partitions import partition_key
    from deconflow.sweep import parse_key

    t0 = time.monotonic()
    _quiet()
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [defs.get_repository_def().assets_defs_by_key[dg.AssetKey("training_run")]],
            partition_key=partition_key(parse_key(key)),
            instance=instance,
            raise_on_error=False,
            tags={LAUNCHED_BY_TAG: "deconflow demo"},
            run_config=QUIET,
        )
    outcome = FAILED
    if result.success:
        mats = result.asset_materializations_for_node("training_run")
        if mats and "outcome" in mats[0].metadata:
            outcome = mats[0].metadata["outcome"].value
    return key, result.success, outcome, time.monotonic() - t0


def materialize_cells(cells: list[Cell], workers: int = 2) -> list[str]:
    """Materialize partitions as real Dagster runs, ``workers`` at a time; returns failures."""
    import dagster as dg
    from tqdm import tqdm

    with dg.DagsterInstance.get():
        pass  # create/migrate the instance's storage once, before workers open it
    t0 = time.monotonic()
    failed = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_materialize_cell, c.key) for c in cells]
        with tqdm(total=len(cells), unit="run", file=sys.stdout, dynamic_ncols=True) as bar:
            for fut in as_completed(futures):
                key, ok, outcome, secs = fut.result()
                bar.set_postfix_str(f"{key} {outcome} {secs:.0f}s")
                bar.update()
                if not ok:
                    failed.append(key)
    print(
        f"trained {len(cells) - len(failed)}/{len(cells)} cells in {time.monotonic() - t0:.0f}s"
        + (f"; failed: {', '.join(sorted(failed))}" if failed else "")
    )
    return failed


def analyse() -> tuple[bool, dict]:
    """Materialize every downstream asset and check in one run; returns (ok, checks)."""
    import dagster as dg

    from deconflow.definitions import defs

    print("analysing: runs, run_fits, hypotheses, completeness, sweep_db, export ...")
    t1 = time.monotonic()
    _quiet()
    repo = defs.get_repository_def()
    downstream = [
        a for k, a in repo.assets_defs_by_key.items() if k.to_user_string() != "training_run"
    ]
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            downstream + list(repo.asset_checks_defs_by_key.values()),
            instance=instance,
            raise_on_error=False,
            run_config=QUIET,
            tags={LAUNCHED_BY_TAG: "deconflow"},
        )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    print(f"analysis {'done' if result.success else 'FAILED'} in {time.monotonic() - t1:.1f}s")
    return result.success, checks
