"""Time the sweep report's build on synthetic full-size runs.

    python -m bench.report_scale [--runs 216] [--steps 19500] [--distinct 216]

Writes published run folders shaped like the `full` profile's (19,500 batch rows and 200
validation rows per run: ``bench.analysis_scale.synth_run``) into a temp data folder, the
analysis tables the report reads (run_fits, hypotheses, exclusions, completeness), then
times ``build_report`` (reading and downsampling every curve with DuckDB, seed bands,
trends, JSON, writing the page) and prints the time and the page's size.

Beyond the 216 cells of the grid the bench adds seeds (4 variants x 3 lr x 3 wd x N seeds).
Only `--distinct` runs are generated; the others are hard links to their files under their
own cell keys (every run is still read from its own path: the build does the same work,
the disk holds less). run_fits is the real fit (``deconflow.warehouse.tables.run_fits``)
for up to 300 distinct runs, else synthesized from each curve's generating parameters.
The quality gates are not part of this timing (they are evaluated on the DuckDB file;
``bench.analysis_scale`` times them).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.analysis_scale import synth_run
from deconflow.protocol import DIVERGED, MATERIALIZED
from deconflow.sweep import Grid, load_grid


def bench_grid(runs: int) -> Grid:
    base = load_grid()
    per_seed = len(base.variants) * len(base.lrs) * len(base.weight_decays)
    seeds = max(len(base.seeds), math.ceil(runs / per_seed))
    return Grid(
        variants=base.variants,
        lrs=base.lrs,
        weight_decays=base.weight_decays,
        seeds=tuple(range(seeds)),
        name=base.name,
    )


def _synthetic_fits(keys: list[str], grid: Grid, rng: np.random.Generator) -> pd.DataFrame:
    """run_fits rows with the columns the report reads (values like synth_run's curves)."""
    from deconflow.sweep import parse_key

    cells = [parse_key(k) for k in keys]
    n = len(keys)
    b = rng.uniform(-0.9, -0.4, n)
    return pd.DataFrame(
        {
            "run_id": keys,
            "variant": [c.variant for c in cells],
            "seed": [c.seed for c in cells],
            "lr": [c.lr for c in cells],
            "weight_decay": [c.weight_decay for c in cells],
            "r_squared": rng.uniform(0.9, 0.99, n),
            "knee_epoch": np.full(n, 400 / 390),
            "burn_in_loss": np.full(n, 0.9),
            "alpha_early": b * 0.05 + rng.normal(0, 0.003, n),
            "alpha_full": b * 0.04,
            "best_val_ce": 0.9 * 1.1 * (19_500 / 400) ** b * np.exp(rng.normal(0, 0.05, n)),
            "best_val_epoch": np.full(n, 50.0),
            "exponent": b,
            "intercept": np.log(0.9) - b * math.log(400),
            "n_points": np.full(n, 19_100),
            "outcome": ["completed"] * n,
            "r_squared_noise_limited": rng.uniform(0.95, 0.995, n),
            "burn_in_step": np.full(n, 400),
        }
    )


def _completeness(grid: Grid, fits: pd.DataFrame) -> pd.DataFrame:
    outcome = dict(zip(fits["run_id"], fits["outcome"], strict=True))
    rows = []
    for c in grid.cells:
        o = outcome.get(c.key)
        status = DIVERGED if o == DIVERGED else MATERIALIZED if o else "missing"
        rows.append(
            {
                "run_id": c.key,
                "partition_key": c.key,
                "variant": c.variant,
                "lr": c.lr,
                "weight_decay": c.weight_decay,
                "seed": c.seed,
                "status": status,
                "attempts": 1 if o else 0,
                "reason": {MATERIALIZED: "ok", DIVERGED: "non-finite training loss"}.get(
                    status, "never materialized"
                ),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=216)
    p.add_argument("--steps", type=int, default=19_500)
    p.add_argument("--distinct", type=int, default=None, help="runs generated (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (prints it)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="deconflow-report-bench-"))
    os.environ["DECONFLOW_DATA"] = str(tmp)
    from deconflow.analysis.hypotheses import hypotheses_table
    from deconflow.report.page import build_report
    from deconflow.warehouse import tables as tables_mod

    try:
        grid = bench_grid(args.runs)
        cells = grid.cells[: args.runs]
        distinct = min(args.distinct or len(cells), len(cells))
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        published: dict[str, Path] = {}
        for i, cell in enumerate(cells):
            d = tmp / "runs" / cell.key
            d.mkdir(parents=True)
            if i < distinct:
                synth_run(d, cell.key, args.steps, rng)
            else:
                src = published[cells[i % distinct].key]
                for f in src.iterdir():
                    os.link(f, d / f.name)
            published[cell.key] = d
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        keys = list(published)
        if distinct <= 300 and distinct == len(keys):
            fits = tables_mod.run_fits(published)
            how = "real fits"
        else:
            fits = _synthetic_fits(keys, grid, rng)
            how = "synthesized fits"
        hyp, excluded = hypotheses_table(fits, n_boot=200 if len(fits) > 1000 else 1000)
        comp = _completeness(grid, fits)
        t_tables = time.perf_counter() - t0
        out = tmp / "report" / "index.html"
        info = build_report(
            out,
            title=f"report bench: {len(keys)} runs",
            coverage={"text": f"{len(keys)} of {len(grid)} cells"},
            completeness=comp,
            fits=fits,
            hypotheses=hyp,
            excluded=excluded,
            gates=None,
            published=published,
        )
        print(f"runs                         {len(keys)} ({distinct} generated, {how})")
        print(f"synthetic runs written       {t_gen:.1f} s ({args.steps} batch rows each)")
        print(f"analysis tables              {t_tables:.1f} s")
        print(f"report: gather (DuckDB etc.) {info['gather_s']:.2f} s")
        print(f"report: whole build          {info['total_s']:.2f} s")
        print(f"report: page size            {info['bytes'] / 1e6:.2f} MB ({out})")
        print(f"curves on the page           {info['curves']} runs")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
