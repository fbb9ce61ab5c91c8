"""Published run folders written by hand (no training): metric files at a profile's
frequencies with known curves, for the warehouse tables, the gates and the DuckDB file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from deconflow.parquet_io import write_parquet
from deconflow.profiles import get_profile
from deconflow.protocol import COMPLETED, DIVERGED, FAMILIES, SUMMARY, family_file
from deconflow.schedule import Schedule
from deconflow.sweep import Cell

SPE = 11  # steps per epoch of the demo profile (digits, batch 128)


def default_loss(step: np.ndarray, seed: int = 0) -> np.ndarray:
    """3 t^-0.4 times log-normal noise: burns in (<= 1.0) at step 16, epoch 1.45."""
    rng = np.random.default_rng(seed)
    return 3.0 * step**-0.4 * np.exp(rng.normal(0.0, 0.05, step.size))


def write_run(
    root: Path,
    cell: Cell,
    *,
    profile: str = "demo",
    epochs: int | None = None,
    loss: Callable[[np.ndarray], np.ndarray] | None = None,
    diverge_at: int | None = None,
    edit: Callable[[dict[str, pd.DataFrame], dict], None] | None = None,
) -> Path:
    """Write ``root/<cell key>`` as a published run of `profile` (`epochs` overrides its
    length). `edit(frames, summary)` may change the frames and summary before writing."""
    cfg = get_profile(profile, **({"epochs": epochs} if epochs else {}))
    sched = Schedule.of(cfg, SPE * cfg.batch_size)
    total = sched.total_steps
    step = np.arange(1, total + 1)
    train = (loss or (lambda s: default_loss(s, cell.seed)))(step.astype(float))
    if diverge_at is not None:
        step, train = step[:diverge_at], train[:diverge_at].copy()
        train[-1] = np.nan
    last = int(step[-1])
    key = cell.key

    def frame(family: str, steps, **cols) -> pd.DataFrame:
        steps = np.asarray(sorted(steps), dtype=np.int64)
        df = pd.DataFrame({"run_id": key, "step": steps, "epoch": steps / SPE})
        for c in FAMILIES[family][2:]:
            v = cols[c]
            df[c] = np.asarray(v(steps) if callable(v) else np.full(steps.size, v), dtype=float)
        return df.astype({"run_id": "string"})

    lrs = np.array([cell.lr * min(1.0, s / max(1, sched.warmup_steps)) for s in step])
    val_steps = [s for s in sched.val_steps if s < last or (diverge_at is None and s <= last)]
    frames = {
        "batch_metrics": frame(
            "batch_metrics",
            step,
            loss_nats=train,
            loss_bits=train / np.log(2.0),
            accuracy=np.clip(1.0 - train / 3.0, 0.0, 1.0),
            lr=lrs,
            weight_decay=cell.weight_decay,
        ),
        "val_metrics": frame(
            "val_metrics",
            val_steps,
            val_loss=lambda s: 2.0 * s**-0.3,
            val_accuracy=0.8,
            grad_norm=1.5,
            weight_norm=30.0,
        ),
        "curvature_metrics": frame(
            "curvature_metrics",
            range(cfg.hessian_every, last + 1, cfg.hessian_every),
            lambda_max=40.0,
            hessian_trace=300.0,
        ),
        "noise_metrics": frame(
            "noise_metrics",
            [s for s in val_steps if s % sched.noise_every == 0],
            psd_tail_ratio=0.4,
            grad_variance=0.01,
            residual_power=0.05,
        ),
    }
    summary = {
        **cell.as_dict(),
        "profile": profile,
        "outcome": DIVERGED if diverge_at is not None else COMPLETED,
        "steps": last,
        "total_steps": total,
        "steps_per_epoch": SPE,
        "epochs": cfg.epochs,
        "final_train_loss": float(train[-1]),
        "best_val_ce": float(frames["val_metrics"]["val_loss"].min()),
        "val_per_epoch": cfg.val_per_epoch,
        "hessian_every": cfg.hessian_every,
        "noise_every_epochs": cfg.noise_every_epochs,
        "attempts": 1,
        "wall_time_s": 1.0,
    }
    if edit is not None:
        edit(frames, summary)
    out = root / key
    out.mkdir(parents=True, exist_ok=True)
    for family, df in frames.items():
        write_parquet(out / family_file(family), df.reset_index(drop=True))
    (out / SUMMARY).write_text(json.dumps(summary))
    return out
