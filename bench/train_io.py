"""Host-side costs of the training loop (issue 23, CPU): metrics writes and steps/s.

    python -m bench.train_io metrics            # flush cost: rewrite-whole vs append parts
    python -m bench.train_io steps [--code DIR] # steps/s of a short synthetic-profile run

``metrics`` replays the rows of one 50-epoch `full` run (390 steps per epoch: 19,500 batch
rows, 200 validation, 39 curvature and 25 noise rows) flushed at every checkpoint (once per
epoch, 50 flushes) or at every validation (200 flushes), written two ways into a temporary
folder: "before", each flush rewriting every family whole (the flush of commit b5441bb), and
"after", each flush appending one part file per family with new rows (today's MetricLog),
plus the one compaction at the run's end. It prints the cost of the first and last flush
and the total, so O(n) per flush (O(n^2) per run) shows as a last flush far dearer than the
first.

``steps`` trains the `synthetic` profile shrunk to run in seconds on a CPU (width x0.125,
2,560 training and 1,000 test images, 2 epochs: 40 steps, 8 validations, every monitor) and
prints steps/s over the whole run (monitors, checkpoints and metrics writes included).
``--code DIR`` imports deconflow from DIR instead (e.g. an export of an older commit:
``git archive b5441bb deconflow | tar -x -C /tmp/ref``) to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _full_run_rows():
    """Rows of a 50-epoch full run by flush point: (step, {family: [row, ...]})."""
    import math

    spe, epochs, vpe = 390, 50, 4
    total = spe * epochs
    val_steps = [round(k * spe / vpe) for k in range(1, epochs * vpe + 1)]
    rows, last = [], 0
    for i, v in enumerate(val_steps):
        fam = {
            "batch_metrics": [
                {
                    "step": s,
                    "epoch": s / spe,
                    "loss_nats": 2.3 / math.sqrt(s),
                    "loss_bits": 2.3 / math.sqrt(s) / math.log(2),
                    "accuracy": 0.5,
                    "lr": 0.1,
                    "weight_decay": 5e-4,
                }
                for s in range(last + 1, v + 1)
            ],
            "val_metrics": [
                {
                    "step": v,
                    "epoch": v / spe,
                    "val_loss": 1.0,
                    "val_accuracy": 0.5,
                    "grad_norm": 1.0,
                    "weight_norm": 30.0,
                }
            ],
            "curvature_metrics": [
                {"step": s, "epoch": s / spe, "lambda_max": 10.0, "hessian_trace": 100.0}
                for s in range(last + 1, v + 1)
                if s % 500 == 0
            ],
            "noise_metrics": [
                {
                    "step": v,
                    "epoch": v / spe,
                    "psd_tail_ratio": 0.1,
                    "grad_variance": 1.0,
                    "residual_power": 0.1,
                }
            ]
            if v % (2 * spe) == 0
            else [],
        }
        rows.append((i, fam))
        last = v
    assert last == total
    return rows


def bench_metrics(every: int) -> dict:
    """Seconds per flush, before and after, flushing at every ``every``-th validation."""
    from deconflow.parquet_io import write_parquet
    from deconflow.protocol import FAMILIES, family_file
    from deconflow.training import checkpoints  # noqa: F401  (torch: imported before timing)
    from deconflow.training.metrics_io import MetricLog

    out = {}
    for how in ("before", "after"):
        with tempfile.TemporaryDirectory() as d:
            log = MetricLog(Path(d), "base__lr0.1_wd0.0005_s0")
            costs, written = [], 0
            for i, fam in _full_run_rows():
                for family, rows in fam.items():
                    log.rows[family].extend(rows)
                if (i + 1) % every:
                    continue
                t = time.perf_counter()
                if how == "before":  # the b5441bb flush: every family rewritten whole
                    for family in FAMILIES:
                        write_parquet(Path(d) / family_file(family), log.frame(family))
                        written += len(log.rows[family])
                else:
                    before = sum(log._written.values())
                    log.flush()
                    written += sum(log._written.values()) - before
                costs.append(time.perf_counter() - t)
            t = time.perf_counter()
            if how == "after":
                log.compact()
            end = time.perf_counter() - t
        out[how] = {"flushes": len(costs), "first": costs[0], "last": costs[-1], "rows": written}
        out[how]["total"] = sum(costs) + end
        out[how]["end"] = end
    return out


def bench_steps(code: str | None) -> dict:
    if code:
        sys.path.insert(0, code)
    import torch

    from deconflow.profiles import get_profile
    from deconflow.sweep import Cell
    from deconflow.training.train import train

    torch.set_num_threads(int(os.environ.get("DECONFLOW_TORCH_THREADS", "1")))
    import deconflow

    cfg = get_profile(
        "synthetic",
        n_train=2560,
        n_test=1000,
        epochs=2,
        width_mult=0.125,
        hessian_every=20,
        hessian_iters=4,
        hutchinson_samples=2,
        hessian_batch=64,
        noise_every_epochs=1,
        noise_microbatches=3,
        warmup_epochs=1.0,
    )
    cell = Cell("base", 0.1, 5e-4, 0)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        s = train(cell, cfg, Path(d) / "run", log=lambda m: None)
        dt = time.perf_counter() - t
    return {
        "code": str(Path(deconflow.__file__).parent),
        "steps": s["steps"],
        "seconds": dt,
        "steps_per_s": s["steps"] / dt,
        "final_train_loss": s["final_train_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["metrics", "steps"])
    p.add_argument("--code", default=None, help="import deconflow from this folder")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    if args.what == "metrics":
        for every, label in ((4, "every checkpoint (50 flushes)"), (1, "every validation (200)")):
            r = bench_metrics(every)
            print(f"flush at {label}:")
            for how in ("before", "after"):
                x = r[how]
                print(
                    f"  {how:<6}  first flush {x['first'] * 1e3:7.1f} ms  last flush "
                    f"{x['last'] * 1e3:7.1f} ms  run total {x['total']:6.2f} s, "
                    f"{x['rows']:,} rows written"
                    + (f" (incl. compaction {x['end'] * 1e3:.0f} ms)" if how == "after" else "")
                )
    else:
        for _ in range(args.repeat):
            r = bench_steps(args.code)
            print(
                f"{r['steps']} steps in {r['seconds']:.1f} s = {r['steps_per_s']:.2f} steps/s "
                f"(final train loss {r['final_train_loss']:.6f}; code {r['code']})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
