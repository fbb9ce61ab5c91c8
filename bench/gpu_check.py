"""GPU figures of issue 15: one time-boxed run that measures everything the issue asks.

    bash bench/gpu_check.sh                 # the real run (H100/H200, ~6-7 min)
    python3 bench/gpu_check.py --quick --device cpu --out /tmp/x   # smoke test on a CPU

Sections (each time-boxed and wrapped: one that fails records its error and the rest go on):

  env          GPU, torch, date, precision settings
  throughput   img/s and extrapolated seconds per 50-epoch `full` run: fp32 eager, the fast
               path without and with torch.compile (channels_last + bf16 autocast); MFU
               against the bf16 dense peak; a proposed cudnn.benchmark variant
  monitors     validation / Hessian / gradient noise / checkpoint cost, overhead in % of
               training time for a 50-epoch run, as implemented and proposed faster variants
  memory       peak GPU memory of a training step and of the Hessian probe per variant
  profiler     top CUDA kernels over ~20 fast-path steps
  correctness  fast path vs fp32 through the real train(): first 200 train losses, Hessian
               lambda_max / trace on the same weights and in-run
  sharing      2 training processes on one GPU vs 1 (aggregate img/s)
  resume       crash@STEP + resume through train() vs an uninterrupted run
  e2e          a real train() of a few epochs with every monitor: seconds per epoch, the
               50-epoch extrapolation, peak memory
  cudagraphs   optional: torch.compile(mode="reduce-overhead") step time

Writes OUT/gpu_figures.json and OUT/gpu_figures.md after every section (OUT: --out, else
the OUT environment variable, else bench_out/). Nothing here needs dagster or duckdb.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.pop("DECONFLOW_FAULT", None)  # train() also reads faults from the environment

import torch  # noqa: E402

from bench.gpu_common import T0, Ctx, free, log  # noqa: E402
from bench.gpu_perf import s_env, s_memory, s_monitors, s_profiler, s_throughput  # noqa: E402
from bench.gpu_runs import s_correctness, s_cudagraphs, s_e2e, s_resume, s_sharing, worker_main  # noqa: E402

SECTIONS = [
    # name, function, minimum seconds left to start it
    ("env", s_env, 0),
    ("throughput", s_throughput, 40),
    ("monitors", s_monitors, 30),
    ("memory", s_memory, 15),
    ("profiler", s_profiler, 15),
    ("correctness", s_correctness, 40),
    ("sharing", s_sharing, 50),
    ("resume", s_resume, 35),
    ("e2e", s_e2e, 35),
    ("cudagraphs", s_cudagraphs, 80),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section")
    p.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="seconds; sections that would start later are skipped",
    )
    p.add_argument("--sections", default="", help="comma-separated subset (env always runs)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--no-compile", action="store_true", help="never torch.compile")
    p.add_argument(
        "--cpu-compile", action="store_true", help="allow torch.compile on CPU (bench steps only)"
    )
    p.add_argument(
        "--width-mult",
        type=float,
        default=None,
        help="model width (default 1; 0.125 with --quick on CPU)",
    )
    p.add_argument("--fail-section", default="", help=argparse.SUPPRESS)  # robustness test
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.width_mult is None:
        a.width_mult = 0.125 if (a.quick and not a.device.startswith("cuda")) else 1.0
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # This process compiles several model instances and modes (train, eval, proposed
    # variants); a training run compiles one model. Keep dynamo from falling back to eager.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    # `timeout` sends SIGTERM: leave through the finally blocks (figures saved, workers ended).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.worker:
        return worker_main(args)
    ctx = Ctx(args)
    only = {x.strip() for x in args.sections.split(",") if x.strip()}
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    log(
        f"gpu_check: device {ctx.device}, out {ctx.out}, budget {args.budget:.0f} s, quick "
        f"{args.quick}"
    )
    try:
        for name, fn, min_s in SECTIONS:
            rec = ctx.R["sections"].setdefault(name, {})
            if name != "env" and ((only and name not in only) or name in skip):
                rec.update(status="skipped", reason="not selected")
                continue
            if ctx.left() < min_s:
                rec.update(
                    status="skipped",
                    reason=f"out of time budget ({ctx.left():.0f} s left, needs ~{min_s} s)",
                )
                log(f"== {name}: skipped, {ctx.left():.0f} s left")
                ctx.save()
                continue
            log(f"== {name} ({ctx.left():.0f} s of budget left)")
            t = time.monotonic()
            try:
                if name == args.fail_section:
                    raise RuntimeError(f"--fail-section {name}: injected failure")
                fn(ctx, rec)
                rec["status"] = "ok"
            except Exception as e:
                rec["status"] = "error"
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                rec["traceback"] = traceback.format_exc()[-4000:]
                log(f"== {name}: ERROR {rec['error'][:300]}")
                print(rec["traceback"], flush=True)
                if name == "env" and ctx.data is None:
                    ctx.load_data()  # the other sections need the data at least
            rec["seconds"] = time.monotonic() - t
            try:
                free(ctx)
            except Exception as e:  # a broken CUDA context: record and go on
                rec["cleanup_error"] = f"{type(e).__name__}: {e}"
            ctx.R["meta"]["elapsed_s"] = time.monotonic() - T0
            ctx.save()
            log(f"== {name}: {rec['status']} in {rec['seconds']:.1f} s")
    finally:
        for rec in ctx.R["sections"].values():
            rec.setdefault("status", "interrupted (time limit or signal)")
        ctx.R["meta"]["elapsed_s"] = time.monotonic() - T0
        ctx.save()
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    log(
        f"done in {time.monotonic() - T0:.0f} s: {ctx.out / 'gpu_figures.json'}, "
        f"{ctx.out / 'gpu_figures.md'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
