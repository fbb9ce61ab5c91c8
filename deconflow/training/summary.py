"""The run's ``summary.json``: outcome, final and best metrics and its power-law fit.

Fit values that do not exist (no burn-in: no power law) are written as null, not NaN."""

from __future__ import annotations

import math

from deconflow.analysis.fits import fit_run
from deconflow.profiles import TrainConfig
from deconflow.sweep import Cell
from deconflow.training.metrics_io import MetricLog


def summarize(
    cell: Cell,
    cfg: TrainConfig,
    metrics: MetricLog,
    outcome: str,
    steps_per_epoch: int,
    total_steps: int,
) -> dict:
    """The run's summary: outcome, final and best metrics and its power-law fit."""
    batch = metrics.frame("batch_metrics").rename(columns={"loss_nats": "loss"})
    val = metrics.frame("val_metrics")
    # The run's own view of its fit (on the materialization): the configured early window
    # and horizon. The sweep's run_fits table recomputes these from the published files.
    fit = (
        fit_run(batch, val, max_epoch=cfg.epochs, alpha_early_epochs=tuple(cfg.alpha_early_epochs))
        if len(batch)
        else {}
    )
    fit = {k: v if isinstance(v, int) or math.isfinite(v) else None for k, v in fit.items()}
    last_val = val.iloc[-1] if len(val) else None
    return {
        **cell.as_dict(),
        "profile": cfg.profile,
        "outcome": outcome,
        "steps": int(batch["step"].max()) if len(batch) else 0,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": cfg.epochs,
        "final_train_loss": float(batch["loss"].iloc[-1]) if len(batch) else None,
        "final_val_loss": float(last_val["val_loss"]) if last_val is not None else None,
        "final_val_accuracy": float(last_val["val_accuracy"]) if last_val is not None else None,
        "best_val_ce": fit.get("best_val_ce"),
        "best_val_epoch": fit.get("best_val_epoch"),
        "r_squared": fit.get("r_squared"),
        "r_squared_noise_limited": fit.get("r_squared_noise_limited"),
        "r_squared_epoch_mean": fit.get("r_squared_epoch_mean"),
        "knee_epoch": fit.get("knee_epoch"),
        "alpha_early": fit.get("alpha_early"),
        "val_per_epoch": cfg.val_per_epoch,
        "hessian_every": cfg.hessian_every,
        "noise_every_epochs": cfg.noise_every_epochs,
    }
