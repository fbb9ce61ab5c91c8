"""Pictures of the sweep as PNG bytes: the analysis assets show them in the UI (inline
images in Markdown metadata) and the sweep report embeds the same files.

Matplotlib is imported on first use, so loading the definitions (and every training run's
process) never pays for it.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from deconflow.protocol import (
    DIVERGED,
    FAILED,
    MATERIALIZED,
    MISSING,
    RUNNING,
    family_file,
)

STATUS_COLORS = {
    MATERIALIZED: "#2e7d32",
    DIVERGED: "#f9a825",
    RUNNING: "#1e88e5",
    FAILED: "#c62828",
    MISSING: "#e0e0e0",
}
MAX_PANELS = 5  # per axis of a variant's small multiples (lr x wd)
MAX_LINES = 8  # seeds drawn per panel
CURVE_POINTS = 400  # a loss curve is decimated to about this many log-spaced points


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig, dpi: int = 80) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def md_image(data: bytes, title: str):
    """Markdown metadata showing the PNG inline in the Dagster UI."""
    import dagster as dg

    b64 = base64.b64encode(data).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{b64})")


def numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Nullable numeric columns (Float64, Int64 with <NA>) as plain floats with NaN."""
    out = df.copy()
    for c, t in df.dtypes.items():
        if str(t) in ("int64", "int32"):
            continue  # plain integers (seed) stay integers
        if pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t):
            out[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return out


def _fmt(x: float) -> str:
    return f"{x:g}"


def _log_indices(n: int, k: int = CURVE_POINTS) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, k).astype(int) - 1)


def loss_curves_variant(
    variant: str,
    fits: pd.DataFrame,
    runs: dict[str, Path],
    lrs: list[float] | None = None,
    wds: list[float] | None = None,
) -> bytes:
    """One variant: lr (rows) x weight decay (columns) panels (the grid's values when
    given, so a partial sweep keeps its layout), one line per seed, with the power-law fit
    dashed over the post-burn-in range and the knee marked."""
    plt = _plt()
    fits = numeric(fits[fits["variant"] == variant])
    lrs = sorted(lrs if lrs is not None else fits["lr"].unique())[:MAX_PANELS]
    wds = sorted(wds if wds is not None else fits["weight_decay"].unique())[:MAX_PANELS]
    fig, axes = plt.subplots(
        len(lrs),
        len(wds),
        figsize=(2.6 * len(wds) + 0.6, 2.1 * len(lrs) + 0.8),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    seeds = sorted(fits["seed"].unique())[:MAX_LINES]
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(seeds)}
    for i, lr in enumerate(lrs):
        for j, wd in enumerate(wds):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_yscale("log")
            cell = fits[np.isclose(fits["lr"], lr) & np.isclose(fits["weight_decay"], wd)]
            cell = cell.sort_values("seed")
            for row in cell.head(MAX_LINES).itertuples():
                path = runs.get(row.run_id)
                if path is None:
                    continue
                b = pd.read_parquet(
                    path / family_file("batch_metrics"), columns=["step", "epoch", "loss_nats"]
                ).sort_values("step")
                idx = _log_indices(len(b))
                step = b["step"].to_numpy(float)[idx]
                loss = b["loss_nats"].to_numpy(float)[idx]
                ok = np.isfinite(loss) & (loss > 0)
                color = colors.get(row.seed, "0.5")
                ax.loglog(step[ok], loss[ok], lw=0.7, alpha=0.6, color=color)
                if np.isfinite(row.exponent) and np.isfinite(row.intercept):
                    t = step
                    if np.isfinite(row.knee_epoch):  # the fit covers the post-burn-in part
                        t = step[b["epoch"].to_numpy(float)[idx] >= row.knee_epoch - 1e-9]
                    if len(t):
                        fit = np.exp(row.intercept) * t**row.exponent
                        ax.loglog(t, fit, "--", lw=1.3, color="black", alpha=0.75)
                        if np.isfinite(row.knee_epoch):
                            ax.plot(t[0], fit[0], "v", ms=6, color=color, mec="black", mew=0.6)
            n_div = int((cell["outcome"] == DIVERGED).sum()) if "outcome" in cell else 0
            ax.set_title(
                f"lr {_fmt(lr)}, wd {_fmt(wd)}" + (f" ({n_div} diverged)" if n_div else ""),
                fontsize=8,
            )
            ax.tick_params(which="both", labelsize=6)
            ax.grid(True, which="major", alpha=0.25)
            if cell.empty:
                ax.text(
                    0.5,
                    0.5,
                    "no run yet",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="0.5",
                    transform=ax.transAxes,
                )
            if i == len(lrs) - 1:
                ax.set_xlabel("step", fontsize=7)
            if j == 0:
                ax.set_ylabel("train loss (nats)", fontsize=7)
    handles = [plt.Line2D([], [], color=colors[s], lw=1.2, label=f"seed {s}") for s in seeds] + [
        plt.Line2D([], [], color="black", ls="--", label="power-law fit (after burn-in)"),
        plt.Line2D([], [], color="0.6", mec="black", marker="v", ls="", label="burn-in knee"),
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(handles), 5),
        fontsize=7,
        bbox_to_anchor=(0.5, 1.0),
    )
    fig.suptitle(
        f"{variant}: train loss and power-law fits ({len(fits)} runs)", fontsize=10, y=1.05
    )
    fig.tight_layout()
    return png(fig)


def r2_histogram(fits: pd.DataFrame) -> bytes:
    """Two panels: the plan's raw R² (limited by batch noise) and the shape R² (raw R²
    over the run's noise-limited estimate) that H1's primary verdict counts."""
    plt = _plt()
    fits = numeric(fits)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.2), squeeze=False)
    panels = [
        ("r_squared", "raw R² of the log-log fit (plan's rule)"),
        ("r_squared_shape", "shape R² = R² / noise-limited R² (H1 primary)"),
    ]
    for ax, (column, label) in zip(axes[0], panels, strict=True):
        r2 = fits[column].astype(float) if column in fits else pd.Series(dtype=float)
        r2 = r2[np.isfinite(r2)]
        lo = min(0.9, float(r2.min())) if len(r2) else 0.9
        hi = max(1.0, float(r2.max())) if len(r2) else 1.0
        for variant, g in fits.groupby("variant"):
            if column not in g:
                continue
            v = g[column].astype(float)
            ax.hist(v[np.isfinite(v)], bins=np.linspace(lo, hi, 31), alpha=0.55, label=variant)
        ax.axvline(0.98, color="red", ls="--", lw=1, label="threshold 0.98")
        share = float((r2 >= 0.98).mean()) if len(r2) else math.nan
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("runs", fontsize=8)
        ax.set_title(f"{len(r2)} runs: {share:.0%} >= 0.98 (H1 needs > 90%)", fontsize=9)
        ax.legend(fontsize=6)
    return png(fig)


def alpha_scatter(fits: pd.DataFrame) -> bytes:
    """alpha_early vs best validation CE, one panel per variant (points coloured by lr)."""
    plt = _plt()
    fits = numeric(fits)
    variants = sorted(fits["variant"].unique())
    n = max(1, len(variants))
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 0.5, 3.2), squeeze=False)
    lrs = sorted(fits["lr"].unique())
    cmap = {lr: plt.cm.viridis(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    for ax, variant in zip(axes[0], variants, strict=False):
        g = fits[fits["variant"] == variant]
        x = g["alpha_early"].astype(float)
        y = g["best_val_ce"].astype(float)
        ok = np.isfinite(x) & np.isfinite(y)
        for lr in lrs:
            sel = ok & (g["lr"] == lr)
            ax.scatter(x[sel], y[sel], s=14, color=cmap[lr], label=f"lr {_fmt(lr)}")
        rho = (
            float(np.corrcoef(x[ok], y[ok])[0, 1])
            if ok.sum() >= 3 and x[ok].std() > 0 and y[ok].std() > 0
            else math.nan
        )
        ax.set_title(f"{variant}: Pearson r {rho:.2f} (n={int(ok.sum())})", fontsize=8)
        ax.set_xlabel("alpha_early (slope over the profile's early epochs)", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("best validation CE", fontsize=7)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("H2: early slope vs best validation CE, per variant", fontsize=10)
    fig.tight_layout()
    return png(fig)


def completeness_heatmap(completeness: pd.DataFrame) -> bytes:
    """variant panels; rows (lr, wd), columns seed; colour = cell status."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    statuses = list(STATUS_COLORS)
    code = {s: i for i, s in enumerate(statuses)}
    cmap = ListedColormap([STATUS_COLORS[s] for s in statuses])
    variants = sorted(completeness["variant"].unique())
    hps = sorted({(r.lr, r.weight_decay) for r in completeness.itertuples()})
    seeds = sorted(completeness["seed"].unique())
    n = max(1, len(variants))
    fig, axes = plt.subplots(
        1,
        n,
        # Wide grids (hundreds of seeds) stay a readable size: cells get thinner.
        figsize=(min(6.0, max(2.2, 0.32 * len(seeds) + 1.4)) * n + 0.6, 0.28 * len(hps) + 1.6),
        squeeze=False,
        sharey=True,
    )
    lookup = {
        (r.variant, r.lr, r.weight_decay, r.seed): r.status for r in completeness.itertuples()
    }
    for ax, variant in zip(axes[0], variants, strict=False):
        grid = np.array(
            [
                [code.get(lookup.get((variant, lr, wd, s), MISSING), 0) for s in seeds]
                for lr, wd in hps
            ]
        )
        ax.imshow(
            grid,
            cmap=cmap,
            vmin=-0.5,
            vmax=len(statuses) - 0.5,
            aspect="auto",
            interpolation="nearest",
        )
        done = int(
            sum(
                lookup.get((variant, lr, wd, s)) in (MATERIALIZED, DIVERGED)
                for lr, wd in hps
                for s in seeds
            )
        )
        ax.set_title(f"{variant} ({done}/{len(hps) * len(seeds)})", fontsize=9)
        every = max(1, math.ceil(len(seeds) / 12))
        shown = list(range(0, len(seeds), every))
        ax.set_xticks(shown, [str(seeds[i]) for i in shown], fontsize=7)
        ax.set_xlabel("seed", fontsize=7)
        if len(seeds) <= 24:  # white cell borders only while cells are wide enough
            ax.set_xticks(np.arange(-0.5, len(seeds)), minor=True)
            ax.set_yticks(np.arange(-0.5, len(hps)), minor=True)
            ax.grid(which="minor", color="white", lw=1)
        ax.tick_params(which="minor", length=0)
    axes[0][0].set_yticks(
        range(len(hps)), [f"lr {_fmt(lr)}, wd {_fmt(wd)}" for lr, wd in hps], fontsize=7
    )
    counts = completeness["status"].value_counts().to_dict()
    fig.legend(
        handles=[
            Patch(color=STATUS_COLORS[s], label=f"{s} ({counts.get(s, 0)})") for s in statuses
        ],
        loc="lower center",
        ncol=len(statuses),
        fontsize=7,
        bbox_to_anchor=(0.5, -0.02),
    )
    fig.suptitle(f"completeness: variant x (lr, wd) x seed, {len(completeness)} cells", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return png(fig)
