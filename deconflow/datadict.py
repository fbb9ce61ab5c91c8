"""The tables and views of the published DuckDB database, in one line each (no imports:
`deconflow sql --help` stays fast). The full data dictionary is in the README."""

TABLES_HELP = {
    "runs": "one row per grid cell: status, outcome, dagster_runs, resumes, failure class",
    "run_fits": "per run: r_squared, knee_epoch, alpha_early, alpha_full, best_val_ce, ...",
    "hypotheses": "H1 / H2 per scope and method: value, 95% CI, threshold, n, passed",
    "hypotheses_excluded": "runs left out of H1 / H2, with the reason",
    "completeness": "one row per grid cell: status and reason",
    "run_settings": "per run: logging settings (steps per epoch, epochs, ...)",
    "batch_metrics": "per step: loss_nats, loss_bits, accuracy, lr, weight_decay (view)",
    "val_metrics": "per 0.25 epoch: val_loss, val_accuracy, grad_norm, weight_norm (view)",
    "curvature_metrics": "per 500 steps: lambda_max, hessian_trace (view)",
    "noise_metrics": "per 2 epochs: psd_tail_ratio, grad_variance, residual_power (view)",
    "publication": "one row: when this snapshot was published and which cells it covers",
}
