"""Entry point of one training process: ``python -m deconflow.training.run``.

Launched by a compute resource (a local subprocess or a SLURM job), it talks to the
Dagster run through Dagster Pipes when the Pipes environment is present: log lines
and progress stream into the run while it trains, and the summary lands as the
materialization's metadata. Run by hand, it just prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from deconflow import settings
from deconflow.profiles import get_profile
from deconflow.protocol import METADATA_FIELDS
from deconflow.sweep import Cell, parse_key
from deconflow.training.train import train


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def set_torch_threads() -> None:
    """Honour DECONFLOW_TORCH_THREADS (local runs use 1: small models on few cores run
    faster single-threaded, and concurrent runs do not fight over cores)."""
    threads = settings.get("DECONFLOW_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def run_cell(cell: Cell, cfg, out: Path, pipes=None) -> dict:
    log = pipes.log.info if pipes is not None else (lambda m: print(m, flush=True))

    def progress(info: dict) -> None:
        line = (
            f"progress step {info['step']}/{info['total_steps']} epoch {info['epoch']:.2f} "
            f"train_loss {info['train_loss']:.4f} val_loss {info['val_loss']:.4f}"
        )
        print(line, flush=True)  # also to the process log, for `tail -f` on a cluster
        if pipes is not None:
            pipes.report_custom_message({"kind": "progress", **info})

    summary = train(cell, cfg, out, log=log, progress=progress)
    try:  # the run's picture (published with its metrics); a picture never fails a run
        from deconflow.training.curve_plot import write_learning_curve

        write_learning_curve(out, title=cell.key)
    except Exception as e:
        log(f"learning curve not drawn: {type(e).__name__}: {e}")
    if pipes is not None:
        meta = {k: _clean(summary.get(k)) for k in METADATA_FIELDS}
        meta["run_dir"] = str(out)
        pipes.report_asset_materialization(
            metadata={k: v for k, v in meta.items() if v is not None}
        )
    return summary


def wait_for_pipes(timeout_s: float, poll_s: float = 0.05) -> bool:
    """Wait until the Dagster run has written this job's Pipes files; whether it did.

    A SLURM job that ``deconflow materialize`` submits ahead of its run starts before the run
    has opened its Pipes session. The session writes the context first and then creates the
    messages file, so both must be there (and the context whole) before the job may talk.
    """
    from dagster_pipes import (
        DAGSTER_PIPES_CONTEXT_ENV_VAR,
        DAGSTER_PIPES_MESSAGES_ENV_VAR,
        decode_env_var,
    )

    context = Path(decode_env_var(os.environ[DAGSTER_PIPES_CONTEXT_ENV_VAR])["path"])
    messages = Path(decode_env_var(os.environ[DAGSTER_PIPES_MESSAGES_ENV_VAR])["path"])
    deadline = time.monotonic() + timeout_s
    while True:
        if messages.exists():
            try:
                json.loads(context.read_text())
                return True
            except (OSError, ValueError):
                pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deconflow.training.run")
    p.add_argument("--key", required=True)
    p.add_argument("--profile", default="demo")
    p.add_argument("--out", required=True)
    p.add_argument("--overrides", default="{}", help="JSON object of TrainConfig overrides")
    p.add_argument(
        "--pipes-wait-s",
        type=float,
        default=0.0,
        help="wait this long for the Dagster run's Pipes files (a job submitted ahead of its run)",
    )
    args = p.parse_args(argv)
    cell = parse_key(args.key)
    overrides = json.loads(args.overrides)
    for k in ("crop_scale", "crop_ratio"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    cfg = get_profile(args.profile, **overrides)
    set_torch_threads()
    # SLURM sends SIGTERM (or --signal's USR1) before killing a job: exit through the
    # normal path so the last checkpoint stays intact and the exit is reported.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    with ExitStack() as stack:
        pipes = None
        if os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            if args.pipes_wait_s > 0 and not wait_for_pipes(args.pipes_wait_s):
                print(f"[deconflow] no Dagster run opened Pipes in {args.pipes_wait_s:.0f} s")
            try:
                pipes = stack.enter_context(open_dagster_pipes())
            except FileNotFoundError as e:
                # The run that submitted this job ended while it was queued (an orchestrator
                # restart): train anyway. The next run of the partition re-attaches and takes
                # the results from summary.json.
                print(f"[deconflow] no Dagster Pipes context ({e.filename}): training without it")
        run_cell(cell, cfg, Path(args.out), pipes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
