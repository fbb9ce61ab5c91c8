"""The learning curve of one run, drawn by the training process when the run ends.

Train loss per step on log-log axes with the fitted power law (post burn-in) and the burn-in
knee, plus the validation loss. Matplotlib and the run's Parquet files only (no torch): the
training process writes ``learning_curve.png`` next to its metrics, publishing carries it to
``data/runs/<cell>/`` and the orchestrator attaches it to the ``training_run`` materialization
without importing matplotlib.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from deconflow.analysis.fits import fit_run
from deconflow.atomic import atomic_write_bytes
from deconflow.protocol import LEARNING_CURVE, SUMMARY, family_file


def render_learning_curve(run_dir: Path, title: str | None = None, dpi: int = 80) -> bytes:
    """PNG bytes of the run's learning curve (about 30-50 KB)."""
    # The Figure API without pyplot: no backend switching, no global figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    batch = pd.read_parquet(
        run_dir / family_file("batch_metrics"), columns=["step", "epoch", "loss_nats"]
    ).sort_values("step")
    val_file = run_dir / family_file("val_metrics")
    val = (
        pd.read_parquet(val_file, columns=["step", "epoch", "val_loss"]).sort_values("step")
        if val_file.exists()
        else pd.DataFrame({"step": [], "epoch": [], "val_loss": []})
    )
    summary = {}
    if (run_dir / SUMMARY).exists():
        summary = json.loads((run_dir / SUMMARY).read_text())
    fit = fit_run(batch.rename(columns={"loss_nats": "loss"}), val) if len(batch) else {}

    step = batch["step"].to_numpy(float)
    loss = batch["loss_nats"].to_numpy(float)
    ok = np.isfinite(loss) & (loss > 0)
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    # Fixed margins, not bbox_inches="tight": that lays the figure out by drawing it a
    # second time, half of the picture's cost in every training.
    ax = fig.subplots(gridspec_kw={"left": 0.14, "right": 0.97, "bottom": 0.12, "top": 0.83})
    ax.loglog(step[ok], loss[ok], color="0.55", lw=0.6, label="train loss (per step)")
    vloss = val["val_loss"].to_numpy(float)
    vok = np.isfinite(vloss) & (vloss > 0)
    if vok.any():
        ax.loglog(
            val["step"].to_numpy(float)[vok],
            vloss[vok],
            "o-",
            ms=2.5,
            lw=1.0,
            color="tab:orange",
            label="validation loss",
        )
    b, a, r2 = (fit.get(k, math.nan) for k in ("exponent", "intercept", "r_squared"))
    # The knee as the fit dates it: the smoothed curve's crossing (analysis.fits.burn_in).
    knee_step = fit.get("burn_in_step", math.nan)
    knee = int(np.searchsorted(step, knee_step)) if math.isfinite(knee_step) else None
    knee_loss = fit.get("burn_in_loss", math.nan)
    if math.isfinite(b) and math.isfinite(a):
        t = step[knee:] if knee is not None else step
        ax.loglog(
            t,
            np.exp(a) * t**b,
            "--",
            color="tab:red",
            lw=1.4,
            label=f"power law  L = {np.exp(a):.3g}·t^{b:.3f}  (R² {r2:.3f})",
        )
    if knee is not None:
        ax.axvline(step[knee], ls=":", color="tab:green", lw=1.0)
        ax.plot(
            step[knee],
            knee_loss,
            "v",
            ms=7,
            color="tab:green",
            label=f"burn-in knee (smoothed): epoch {fit['knee_epoch']:.2f}, loss {knee_loss:.3f}",
        )
    spe = summary.get("steps_per_epoch")
    if spe:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
        top.set_xlabel("epoch", fontsize=8)
        top.tick_params(labelsize=7)
    outcome = summary.get("outcome")
    head = title or run_dir.name
    if outcome and outcome != "completed":
        head += f" ({outcome})"
    ax.set_title(head, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss (nats)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def write_learning_curve(run_dir: Path, title: str | None = None) -> Path:
    """Draw the curve into ``run_dir/learning_curve.png`` (atomically); returns the path."""
    png = render_learning_curve(run_dir, title)
    path = Path(run_dir) / LEARNING_CURVE
    atomic_write_bytes(path, lambda f: f.write(png))
    return path
