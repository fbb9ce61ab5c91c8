"""Pictures for the Dagster UI: PNGs embedded in Markdown metadata."""

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import dagster as dg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from deconflow.protocol import family_file  # noqa: E402


def _md(fig, title: str) -> dg.MetadataValue:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    b64 = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{b64})")


def loss_curves(runs: dict[str, Path], fits: pd.DataFrame, max_runs: int = 8) -> dg.MetadataValue:
    """Log-log train loss vs step for a few runs, with their power-law fits dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in fits.head(max_runs).itertuples():
        b = pd.read_parquet(
            runs[row.run_id] / family_file("batch_metrics"), columns=["step", "epoch", "loss_nats"]
        )
        (line,) = ax.loglog(b["step"], b["loss_nats"], lw=0.7, alpha=0.8, label=row.run_id)
        if np.isfinite(row.exponent):
            t = b["step"].to_numpy(float)
            if np.isfinite(row.knee_epoch):
                t = t[
                    b["epoch"].to_numpy() >= row.knee_epoch
                ]  # the fit covers the post-burn-in part
            ax.loglog(t, np.exp(row.intercept) * t**row.exponent, "--", color=line.get_color())
    ax.set(xlabel="step", ylabel="train loss (nats)", title="loss curves and power-law fits")
    ax.legend(fontsize=5)
    return _md(fig, "loss curves")


def r2_histogram(fits: pd.DataFrame) -> dg.MetadataValue:
    fig, ax = plt.subplots(figsize=(5, 3))
    r2 = fits["r_squared"].dropna()
    ax.hist(r2, bins=30)
    ax.axvline(0.98, color="red", ls="--", label="H1 threshold 0.98")
    ax.set(xlabel="R² of the log-log fit", ylabel="runs", title=f"R² over {len(r2)} runs")
    ax.legend(fontsize=7)
    return _md(fig, "R² histogram")


def alpha_scatter(fits: pd.DataFrame) -> dg.MetadataValue:
    fig, ax = plt.subplots(figsize=(5, 4))
    for variant, g in fits.groupby("variant"):
        ax.scatter(g["alpha_early"], g["best_val_ce"], s=12, label=variant)
    ax.set(
        xlabel="alpha_early (slope, epochs 5-15)",
        ylabel="best validation CE",
        title="H2: early slope vs best validation CE",
    )
    ax.legend(fontsize=7)
    return _md(fig, "alpha_early vs best_val_ce")
