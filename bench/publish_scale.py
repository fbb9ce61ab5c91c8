"""Publishing cost at scale: how long one newly landed cell takes to show in DuckDB.

    python -m bench.publish_scale --runs 216
    python -m bench.publish_scale --runs 10000 [--data /big/disk/folder] [--keep]

Writes ``--runs`` synthetic published run folders shaped like the ``full`` profile's
(19,500 batch rows, 200 validation, 39 curvature and 25 noise rows per run; the generator of
``bench.analysis_scale``) and analysis tables with one row per cell, then measures with
:func:`deconflow.warehouse.database.publish_database`:

1. the first publication of the whole sweep, and the compaction that follows it;
2. one newly landed cell (the figure that must stay <= 2 s), five times;
3. one re-run cell (its folder replaced whole);
4. the landing that fills a segment (publication + the merge after it);
5. what readers pay: opening the file and a few queries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from bench.analysis_scale import synth_run
from deconflow.sweep import grid_from_dict
from deconflow.warehouse.store import connect_readonly

PER_VARIANT = (
    "SELECT r.variant, avg(b.loss_nats) FROM batch_metrics b JOIN runs r USING (run_id) GROUP BY 1"
)


def grid_of(n: int):
    """The SPEC grid with enough seeds for ``n`` cells."""
    per_seed = 4 * 3 * 3
    seeds = list(range(-(-n // per_seed)))
    return grid_from_dict(
        {
            "variants": ["base", "bn_off", "narrow", "adamw"],
            "lr": [0.05, 0.1, 0.2],
            "weight_decay": [1e-4, 1e-3, 1e-2],
            "seed": seeds,
        }
    )


def _write(args) -> None:
    root, keys, steps, seed = args
    rng = np.random.default_rng(seed)
    for key in keys:
        d = Path(root) / "runs" / key
        if (d / "summary.json").exists():
            continue
        tmp = Path(root) / "runs" / f".gen-{key}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        synth_run(tmp, key, steps, rng)
        os.rename(tmp, d)


def generate(root: Path, keys: list[str], steps: int, workers: int) -> float:
    t0 = time.perf_counter()
    chunks = [keys[i :: workers * 8] for i in range(workers * 8)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write, [(str(root), c, steps, i) for i, c in enumerate(chunks)]))
    return time.perf_counter() - t0


def tables(grid, keys: list[str]) -> dict[str, pd.DataFrame]:
    """Analysis tables of the sizes the assets publish (one row per cell / run)."""
    cells = {c.key: c for c in grid.cells}
    landed = set(keys)
    ident = pd.DataFrame(
        [
            {
                "run_id": c.key,
                "variant": c.variant,
                "lr": c.lr,
                "weight_decay": c.weight_decay,
                "seed": c.seed,
            }
            for c in grid.cells
        ]
    )
    status = np.where(ident["run_id"].isin(landed), "materialized", "missing")
    runs = ident.assign(status=status, dagster_runs=1, resumes=0, wall_time_s=60.0)
    fits = ident[ident["run_id"].isin(landed)].assign(
        r_squared=0.99,
        knee_epoch=1.2,
        burn_in_loss=0.9,
        alpha_early=-0.01,
        alpha_full=-0.02,
        best_val_ce=0.5,
        best_val_epoch=40.0,
        exponent=-0.5,
        intercept=1.0,
        n_points=19000,
        outcome="completed",
    )
    settings = fits[["run_id"]].assign(
        steps_per_epoch=390, epochs=50, val_per_epoch=4, hessian_every=500, noise_every_epochs=2
    )
    hyp = pd.DataFrame({"hypothesis": ["H1", "H2"], "scope": "pooled", "value": [0.9, 0.5]})
    assert set(cells) >= landed
    return {
        "runs": runs,
        "run_settings": settings,
        "run_fits": fits,
        "hypotheses": hyp,
        "hypotheses_excluded": pd.DataFrame({"hypothesis": [], "run_id": [], "reason": []}),
        "completeness": runs[["run_id", "variant", "lr", "weight_decay", "seed", "status"]],
    }


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=216)
    p.add_argument("--steps", type=int, default=19_500)
    p.add_argument("--data", help="data folder (default: a new temp folder)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the data folder")
    args = p.parse_args(argv)
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="deconflow-pub-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ["DECONFLOW_DATA"] = str(root)
    from deconflow.warehouse.database import compact_database, publish_database, scan_published

    grid = grid_of(args.runs + args.repeats + 40)
    keys = [c.key for c in grid.cells]
    base, extra = keys[: args.runs], keys[args.runs :]
    rows = []
    t_gen = generate(root, base + extra, args.steps, args.workers)
    rows.append(
        (f"synthetic runs written ({len(base) + len(extra)} x {args.steps})", f"{t_gen:.0f} s")
    )
    db = root / "deconflow.duckdb"
    runs_root = root / "runs"
    landed = list(base)
    table_dir = root / "tables"
    table_dir.mkdir(exist_ok=True)

    def publish(label: str) -> dict:
        """What sweep_db does: scan the run folders, read the tables, publish."""
        for name, df in tables(grid, landed).items():  # the upstream assets' output
            df.to_parquet(table_dir / f"{name}.parquet", index=False)
        t0 = time.perf_counter()
        pub = scan_published(runs_root, frozenset(landed))
        t_scan = time.perf_counter() - t0
        inputs = {p.stem: pd.read_parquet(p) for p in table_dir.glob("*.parquet")}
        report = publish_database(db, pub, inputs)
        total = time.perf_counter() - t0
        report["wall"] = total
        report["scan"] = t_scan
        return report

    r = publish("first")
    t = r["timings"]
    rows.append(
        (
            f"first publication of {len(landed)} runs: visible / merging (10 s budget) after",
            f"{t['total_s'] - t.get('compaction_s', 0):.1f} s / {t.get('compaction_s', 0):.1f} s",
        )
    )
    c = compact_database(db)
    rows.append(
        (
            f"compaction after it ({c['compacted_cells']} cells into segments)",
            f"{c['seconds']:.1f} s",
        )
    )
    # Steady state: one newly landed cell at a time.
    new_times, phases = [], []
    for k in extra[: args.repeats]:
        landed.append(k)
        r = publish("new")
        new_times.append(r["wall"] - r["timings"].get("compaction_s", 0))
        phases.append({**r["timings"], "scan": r["scan"]})
    med = statistics.median(new_times)
    rows.append(
        (
            "**one newly landed cell: visible in DuckDB** (median of "
            f"{len(new_times)}, max {max(new_times):.2f} s)",
            f"**{med:.2f} s**",
        )
    )
    ph = {k: statistics.median(p.get(k, 0) for p in phases) for k in phases[0]}
    rows.append(
        (
            "  of which: scan of the run folders / link the cell / snapshot / swap",
            f"{ph['scan']:.2f} / {ph['parts_s']:.2f} / {ph['snapshot_s']:.2f} / "
            f"{ph['swap_s']:.2f} s",
        )
    )
    # A re-run: the folder replaced whole, as publish_run does.
    victim = base[len(base) // 2]
    shutil.rmtree(runs_root / victim)
    _write((str(root), [victim], args.steps, 999))
    r = publish("rerun")
    rows.append(
        (
            "one re-run cell (its old rows hidden, new ones visible)",
            f"{r['wall'] - r['timings'].get('compaction_s', 0):.2f} s "
            f"(+ {r['timings'].get('compaction_s', 0):.2f} s segment rewrite after)",
        )
    )
    # Land cells until a segment fills: the worst publication (with its merge).
    worst = None
    for k in extra[args.repeats :]:
        landed.append(k)
        r = publish("fill")
        if r.get("compacted_units"):
            worst = r
            break
    if worst:
        comp = worst["timings"].get("compaction_s", 0)
        rows.append(
            (
                "the landing that fills a segment: visible / merge after it",
                f"{worst['wall'] - comp:.2f} s / {comp:.2f} s",
            )
        )
    # Readers.

    def q(sql: str) -> float:
        t0 = time.perf_counter()
        con = connect_readonly(db)
        con.execute(sql).fetchall()
        con.close()
        return time.perf_counter() - t0

    probe = base[0]
    rows.append(
        ("reader: open + SELECT count(*) FROM runs", f"{q('SELECT count(*) FROM runs'):.3f} s")
    )
    rows.append(
        (
            "reader: open + one run's batch_metrics (19,500 rows)",
            f"{q(f'SELECT * FROM batch_metrics WHERE run_id = {probe!r}'):.3f} s",
        )
    )
    rows.append(
        (
            "reader: open + count(*) over all batch_metrics",
            f"{q('SELECT count(*) FROM batch_metrics'):.2f} s",
        )
    )
    rows.append(
        (
            "reader: open + avg(loss_nats) per variant over all batch rows",
            f"{q(PER_VARIANT):.2f} s",
        )
    )
    man = json.loads((root / "deconflow.warehouse" / "manifest.json").read_text())
    rows.append(("DuckDB file users open", f"{db.stat().st_size / 2**20:.1f} MiB"))
    rows.append(("Parquet files behind its views", str(r.get("files", "?"))))
    rows.append(("manifest cells", str(len(man["cells"]))))
    rows.append(
        (
            "store (segments; loose parts are hard links)",
            f"{du(root / 'deconflow.warehouse' / 'parts' / 'segments') / 2**30:.2f} GiB",
        )
    )
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    if not args.keep and not args.data:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
