"""The data dictionary of the published DuckDB database: the one source.

Every table and view users query, what one row is, and every column's meaning. It feeds
`deconflow sql --help`, DuckDB's ``COMMENT ON TABLE / COLUMN`` in every publication,
Dagster's column descriptions, the export's metadata.json, and docs/data-dictionary.md
(``python3 -m deconflow.datadict > docs/data-dictionary.md``; a test keeps it in sync).
No imports: `deconflow sql --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    grain: str  # what one row is
    summary: str  # one line, for `deconflow sql --help`
    columns: dict[str, str] = field(default_factory=dict)
    view: bool = False  # a VIEW over the Parquet parts (the metric families)


_CELL = {
    "run_id": "cell key, e.g. base__lr0.1_wd0.0001_s0",
    "partition_key": "Dagster partition key (hp|variant)",
    "variant": "base, bn_off, narrow or adamw",
    "lr": "peak learning rate of the cell",
    "weight_decay": "weight decay of the cell",
    "seed": "seed of the cell",
}
_STEP = {
    "run_id": "cell key",
    "step": "optimizer step (1-based)",
    "epoch": "fractional epoch of the step",
}

# run_fits: the plan's columns first (SPEC section 5), then the noise-aware fit columns;
# (pandas dtype, meaning). warehouse/tables.py builds the table in this order and types.
FIT_COLUMN_DOCS: dict[str, tuple[str, str]] = {
    "run_id": ("string", "cell key"),
    "variant": ("string", "base, bn_off, narrow or adamw"),
    "seed": ("int64", "seed of the cell"),
    "lr": ("float64", "peak learning rate of the cell"),
    "weight_decay": ("float64", "weight decay of the cell"),
    "r_squared": (
        "Float64",
        "R² of the plan's power law: log L = log a + b log t by least squares over every "
        "per-batch train loss from the burn-in step on (null: no burn-in)",
    ),
    "knee_epoch": (
        "Float64",
        "fractional epoch of the first step whose smoothed train CE (centred moving mean "
        "over one epoch of batches) is <= 1.0 (null: no burn-in)",
    ),
    "burn_in_loss": ("Float64", "smoothed train CE at that step"),
    "alpha_early": (
        "Float64",
        "least-squares slope (nats/epoch) of the per-epoch mean train loss over the "
        "plan's calculate_slope(5, 15), 0-based end-exclusive: epochs 6-15 counted from 1, "
        "right after the warm-up (profile window alpha_early_from..alpha_early_to, scaled)",
    ),
    "alpha_full": (
        "Float64",
        "the same slope from burn-in to the end: per-epoch means of the batches at or after "
        "the burn-in step, each at the mean epoch of its batches (null: no burn-in, or fewer "
        "than 5 epoch means: see alpha_full_few_points)",
    ),
    "alpha_full_few_points": (
        "bool",
        "true when the run burnt in but had fewer than 5 per-epoch means after it, so "
        "alpha_full is withheld",
    ),
    "best_val_ce": ("Float64", "lowest validation CE within the profile's epochs"),
    "best_val_epoch": ("Float64", "fractional epoch where it first occurs"),
    "exponent": ("Float64", "b of the raw power-law fit (negative: a falling loss)"),
    "intercept": ("Float64", "log a of the raw power-law fit (natural log)"),
    "n_points": ("int64", "batches in the raw fit (0: no burn-in)"),
    "n_dropped_nonfinite": (
        "int64",
        "batch rows within the horizon dropped because the loss was non-finite or <= 0",
    ),
    "outcome": ("string", "completed or diverged"),
    "r_squared_noise_limited": (
        "Float64",
        "estimate of the R² the noise-free trend would reach under this run's batch noise: "
        "1 - noise_var / Var(log L) over the fitted points, clipped at 0 (an estimate, not a "
        "bound: r_squared can exceed it)",
    ),
    "r_squared_shape": (
        "Float64",
        "r_squared / r_squared_noise_limited: the power law's R² against the noise-free trend "
        "(near 1 when the shape is a power law, whatever the batch noise); H1's primary rule",
    ),
    "noise_var": (
        "Float64",
        "batch-to-batch noise variance of log L after burn-in, from second differences: "
        "sum((y[i-1] - 2 y[i] + y[i+1])²) / (6 m) over the m triples of consecutive steps "
        "(a dropped batch never makes a difference across a gap)",
    ),
    "r_squared_epoch_mean": (
        "Float64",
        "R² of the same power law fitted to the post-burn-in per-epoch mean losses against "
        "the mean step of each epoch's batches",
    ),
    "exponent_epoch_mean": ("Float64", "b of that per-epoch-mean fit"),
    "intercept_epoch_mean": ("Float64", "log a of that per-epoch-mean fit"),
    "n_epoch_means": ("int64", "epochs in that fit (the knee's partial epoch counts)"),
    "burn_in_step": ("Int64", "the burn-in step (null: no burn-in)"),
    "alpha_early_from": (
        "int64",
        "start of the alpha_early window in the plan's notation (0-based: the first epoch "
        "used is alpha_early_from + 1 counted from 1)",
    ),
    "alpha_early_to": (
        "int64",
        "end of the alpha_early window, exclusive in 0-based epochs (= the last epoch used, "
        "counted from 1)",
    ),
    "profile": ("string", "training profile of the run"),
}

TABLES: dict[str, Table] = {
    "runs": Table(
        "grid cell",
        "one row per grid cell: status, outcome, dagster_runs, resumes, failure class",
        {
            **_CELL,
            "status": "materialized, diverged, running, failed or missing",
            "outcome": "completed or diverged (null: not published)",
            "attempts": "Dagster runs of this cell, retries included",
            "resumes": "checkpoint resumes inside the Dagster run that published the cell",
            "wall_time_s": "wall-clock seconds of the published run",
            "slurm_job_id": "SLURM job id of the published run (null: local)",
            "failure_class": "class of the latest failure (oom, time_limit, disk_full, ...)",
            "failure_reason": "one line: why the latest attempt failed",
            "steps": "optimizer steps the run logged",
            "profile": "training profile of the run",
            "final_train_loss": "train loss (nats) at the last step",
            "best_val_ce": "lowest validation CE of the run",
            "dagster_run_id": "the Dagster run that published the cell",
        },
    ),
    "run_fits": Table(
        "run",
        "per run: r_squared, knee_epoch, alpha_early, alpha_full, best_val_ce, ...",
        {k: doc for k, (_, doc) in FIT_COLUMN_DOCS.items()},
    ),
    "hypotheses": Table(
        "test x tier x scope x method",
        "H1 / H2: one primary row each with its verdict; secondary (per variant, Holm) and "
        "exploratory rows (docs/science.md)",
        {
            "hypothesis": "H1 (power-law prevalence) or H2 (early slope predicts best val CE)",
            "tier": "primary (the one pre-declared answer), secondary (per variant, "
            "Holm-adjusted) or exploratory (pooled, per lr, the plan's raw-R² rule)",
            "primary": "true on the one pre-declared primary row of each hypothesis",
            "scope": "what the row covers, e.g. 'within variant, combined (4 variants)', "
            "variant=<v>, pooled",
            "method": "H1: shape or raw R² >= 0.98 fraction; H2: Fisher-z combined "
            "within-variant Pearson, pearson, spearman, partial on lr",
            "smoothing": "the loss curve the value rests on (shape, raw or epoch_mean)",
            "value": "H1: fraction of runs passing the R² rule; H2: the correlation",
            "ci_low": "lower end of the 95% CI (null: n too small)",
            "ci_high": "upper end of the 95% CI (null: n too small)",
            "ci_method": "wilson 95% (H1), stratified bootstrap BCa or bootstrap (H2), or none",
            "threshold": "0.9 (H1, strict) or 0.7 (H2)",
            "n": "runs used",
            "verdict": "PASS (the CI clears the threshold), FAIL (the CI lies wholly on the "
            "wrong side) or INCONCLUSIVE",
            "p_holm": "Holm-adjusted one-sided p-value of the secondary per-variant rows",
            "passed": "verdict = PASS",
            "point_passed": "what the point estimate alone would say, reported beside it",
            "note": "counts, and why a row cannot pass",
        },
    ),
    "hypotheses_excluded": Table(
        "excluded run x test",
        "runs left out of H1 / H2, with the reason",
        {
            "hypothesis": "H1 or H2",
            "run_id": "cell key",
            "reason": "diverged, no burn-in, r_squared / alpha_early not finite, or no "
            "finite validation loss (the first that applies)",
        },
    ),
    "completeness": Table(
        "grid cell",
        "one row per grid cell: status and reason",
        {
            **_CELL,
            "status": "materialized, diverged, running, failed or missing",
            "attempts": "Dagster runs of this cell, retries included",
            "reason": "why the cell is in that state",
        },
    ),
    "run_settings": Table(
        "run",
        "per run: logging settings (steps per epoch, epochs, ...)",
        {
            "run_id": "cell key",
            "profile": "training profile of the run",
            "steps_per_epoch": "optimizer steps per epoch",
            "epochs": "epochs of the run",
            "val_per_epoch": "validation points per epoch",
            "hessian_every": "steps between curvature points",
            "noise_every_epochs": "epochs between gradient-noise points",
        },
    ),
    "batch_metrics": Table(
        "step",
        "per step: loss_nats, loss_bits, accuracy, lr, weight_decay (view)",
        {
            **_STEP,
            "loss_nats": "train loss of the batch (nats)",
            "loss_bits": "the same in bits (= nats / ln 2)",
            "accuracy": "train accuracy of the batch",
            "lr": "learning rate at the step",
            "weight_decay": "weight decay at the step",
        },
        view=True,
    ),
    "val_metrics": Table(
        "0.25 epoch",
        "per 0.25 epoch: val_loss, val_accuracy, grad_norm, weight_norm (view)",
        {
            **_STEP,
            "val_loss": "validation loss (nats)",
            "val_accuracy": "validation accuracy",
            "grad_norm": "gradient norm at that step (pre-clipping)",
            "weight_norm": "weight norm at that step",
        },
        view=True,
    ),
    "curvature_metrics": Table(
        "500 steps (the profile's hessian_every)",
        "per 500 steps: lambda_max, hessian_trace (view)",
        {
            **_STEP,
            "lambda_max": "largest Hessian eigenvalue (power iteration on Hessian-vector products)",
            "hessian_trace": "Hessian trace (Hutchinson, Rademacher probes)",
        },
        view=True,
    ),
    "noise_metrics": Table(
        "2 epochs",
        "per 2 epochs: psd_tail_ratio, grad_variance, residual_power (view)",
        {
            **_STEP,
            "psd_tail_ratio": "share of the loss signal's PSD in the upper half of frequencies",
            "grad_variance": "mean per-parameter variance of micro-batch gradients",
            "residual_power": "mean squared residual of the loss around its EWMA",
        },
        view=True,
    ),
    "publication": Table(
        "one row",
        "one row: when this snapshot was published and which cells it covers",
        {
            "published_at": "when this snapshot was published (UTC)",
            "snapshot": "sequence number of the snapshot",
            "cells": "published runs it covers",
            "newest_landed_at": "publication time of the newest published run folder",
            "newest_landed_run_id": "cell key of that folder",
            "newest_landing_event_id": "newest training_run materialization the analysis saw",
            "newest_landing_cell": "its cell key",
        },
    ),
}

# `deconflow sql --help`: one line per table.
TABLES_HELP = {name: t.summary for name, t in TABLES.items()}


def column_docs(table: str) -> dict[str, str]:
    """Column -> meaning for ``table`` (empty for a table the dictionary does not know)."""
    t = TABLES.get(table)
    return dict(t.columns) if t else {}


def markdown() -> str:
    """docs/data-dictionary.md."""
    out = [
        "# Data dictionary (DuckDB)",
        "",
        "<!-- generated by `python3 -m deconflow.datadict > docs/data-dictionary.md` from "
        "deconflow/datadict.py; do not edit (tests/test_datadict.py checks it) -->",
        "",
        "The tables and views of `data/deconflow.duckdb`. The same text is in the file "
        "itself (`SELECT table_name, comment FROM duckdb_tables()`, `duckdb_columns()`) and "
        "in the Dagster UI's column schemas.",
        "",
        "| table | one row per | holds |",
        "| --- | --- | --- |",
    ]
    for name, t in TABLES.items():
        out.append(f"| `{name}`{' (view)' if t.view else ''} | {t.grain} | {_cell(t.summary)} |")
    for name, t in TABLES.items():
        out += ["", f"## `{name}`", "", f"One row per {t.grain}.", ""]
        out += ["| column | meaning |", "| --- | --- |"]
        out += [f"| `{c}` | {_cell(doc)} |" for c, doc in t.columns.items()]
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())
