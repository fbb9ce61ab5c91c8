"""Downstream analysis assets on synthetic full-scale metrics.

    python -m bench.analysis_scale [--runs 216] [--steps 19500] [--fits-only]

Writes published run folders shaped like the `full` profile's (19,500 batch rows,
200 validation, 39 curvature and 25 noise rows per run, following a power law after
a burn-in) into a temp data folder, then materializes every downstream asset and
check through Dagster on an ephemeral instance and prints each step's time.

`--fits-only` times the `run_fits` table function alone (no Dagster), wall and CPU
seconds, best of 3: on a shared machine the CPU time is the figure that does not depend
on the other tenants.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from deconflow.parquet_io import write_parquet
from deconflow.sweep import load_grid


def synth_run(out: Path, key: str, steps: int, rng: np.random.Generator) -> None:
    spe = 390
    epochs = steps // spe
    step = np.arange(1, steps + 1)
    b = rng.uniform(-0.9, -0.4)
    loss = np.where(step < 400, 2.3 - step / 400 * 1.4, 0.9 * (step / 400) ** b)
    loss = loss * np.exp(rng.normal(0, 0.08, steps))
    epoch = step / spe
    run = {"run_id": key, "step": step, "epoch": epoch}
    write_parquet(
        out / "batch_metrics.parquet",
        pd.DataFrame(
            {
                **run,
                "loss_nats": loss,
                "loss_bits": loss / np.log(2),
                "accuracy": np.clip(1 - loss / 2.5, 0, 1),
                "lr": 0.1 * np.ones(steps),
                "weight_decay": 1e-3 * np.ones(steps),
            }
        ),
    )
    vstep = np.array([round(k * spe / 4) for k in range(1, epochs * 4 + 1)])
    write_parquet(
        out / "val_metrics.parquet",
        pd.DataFrame(
            {
                "run_id": key,
                "step": vstep,
                "epoch": vstep / spe,
                "val_loss": loss[vstep - 1] * 1.1,
                "val_accuracy": 0.8,
                "grad_norm": 1.0,
                "weight_norm": 50.0,
            }
        ),
    )
    hstep = np.arange(500, steps + 1, 500)
    write_parquet(
        out / "curvature_metrics.parquet",
        pd.DataFrame(
            {
                "run_id": key,
                "step": hstep,
                "epoch": hstep / spe,
                "lambda_max": 10.0,
                "hessian_trace": 100.0,
            }
        ),
    )
    nstep = np.arange(2 * spe, steps + 1, 2 * spe)
    write_parquet(
        out / "noise_metrics.parquet",
        pd.DataFrame(
            {
                "run_id": key,
                "step": nstep,
                "epoch": nstep / spe,
                "psd_tail_ratio": 0.5,
                "grad_variance": 1e-4,
                "residual_power": 1e-3,
            }
        ),
    )
    (out / "summary.json").write_text(
        json.dumps(
            {
                "outcome": "completed",
                "steps": steps,
                "total_steps": steps,
                "steps_per_epoch": spe,
                "epochs": epochs,
                "val_per_epoch": 4,
                "hessian_every": 500,
                "noise_every_epochs": 2,
                "profile": "synthetic",
                "wall_time_s": 60.0,
                "attempts": 1,
            }
        )
    )


def fits_only(n_runs: int, steps: int) -> int:
    """Best of 3 wall and CPU seconds of `run_fits` over `n_runs` synthetic runs."""
    from deconflow.warehouse import tables as tables_mod

    tmp = Path(tempfile.mkdtemp(prefix="deconflow-bench-"))
    rng = np.random.default_rng(0)
    runs = {}
    for cell in load_grid().cells[:n_runs]:
        d = tmp / "runs" / cell.key
        d.mkdir(parents=True)
        synth_run(d, cell.key, steps, rng)
        runs[cell.key] = d
    tables_mod.run_fits(dict(list(runs.items())[:2]))  # imports and first-call costs
    best_wall = best_cpu = float("inf")
    for _ in range(3):
        w0, c0 = time.perf_counter(), time.process_time()
        fits = tables_mod.run_fits(runs)
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    print(
        f"run_fits over {len(fits)} runs x {steps} batch rows: "
        f"{best_wall:.2f} s wall, {best_cpu:.2f} s CPU (best of 3)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=216)
    p.add_argument("--steps", type=int, default=19_500)
    p.add_argument("--fits-only", action="store_true", help="time run_fits alone")
    args = p.parse_args(argv)
    if args.fits_only:
        return fits_only(args.runs, args.steps)
    tmp = Path(tempfile.mkdtemp(prefix="deconflow-bench-"))
    os.environ["DECONFLOW_DATA"] = str(tmp)
    import dagster as dg

    from deconflow.definitions import defs

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    cells = load_grid().cells[: args.runs]
    for cell in cells:
        d = tmp / "runs" / cell.key
        d.mkdir(parents=True)
        synth_run(d, cell.key, args.steps, rng)
    t_gen = time.perf_counter() - t0
    repo = defs.get_repository_def()
    assets = [a for k, a in repo.assets_defs_by_key.items() if k.to_user_string() != "training_run"]
    t0 = time.perf_counter()
    result = dg.materialize(
        assets + list(repo.asset_checks_defs_by_key.values()),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
    )
    t_all = time.perf_counter() - t0
    rows = [(f"synthetic runs written ({args.runs} x {args.steps} batch rows)", f"{t_gen:.1f} s")]
    for ev in result.all_events:
        if ev.event_type_value == "STEP_SUCCESS":
            rows.append(
                (f"step {ev.step_key}", f"{ev.event_specific_data.duration_ms / 1000:.2f} s")
            )
    rows.append(("whole downstream run (incl. Dagster overhead)", f"{t_all:.1f} s"))

    # The live sweep's refresh: nothing new, then one cell landed again (its run republished).
    export = repo.assets_defs_by_key[dg.AssetKey("export")]
    for label in ("export again, no run changed", "export again, one run republished"):
        if "one run" in label:
            synth_run(tmp / "runs" / cells[0].key, cells[0].key, args.steps, rng)
        t0 = time.perf_counter()
        again = dg.materialize([export], instance=dg.DagsterInstance.ephemeral())
        step = next(e for e in again.all_events if e.event_type_value == "STEP_SUCCESS")
        files = again.asset_materializations_for_node("export")[0].metadata
        rows.append(
            (
                f"step export: {label}",
                f"{step.event_specific_data.duration_ms / 1000:.2f} s "
                f"({time.perf_counter() - t0:.1f} s with Dagster; "
                f"{files['timeseries_rewritten'].value} series rewritten)",
            )
        )
    size = (tmp / "deconflow.duckdb").stat().st_size / 2**20
    rows.append(("DuckDB file", f"{size:.0f} MiB"))
    rows.append(("success", str(result.success)))
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
