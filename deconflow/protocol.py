"""The run protocol: the one owner of every name that two parts of deconflow share.

Run tags on Dagster runs, file names inside a run's work and published folders, metric
families and their columns, the cell-status vocabulary, the Dagster-run-status -> cell
status map. Nothing else spells these literals. Key <-> cell conversions are owned by
:mod:`deconflow.keys` (re-exported here for the modules that import them from the protocol).

No Dagster, no torch: the training process, the orchestrator and the warehouse all import it.
"""

from __future__ import annotations

from deconflow.keys import (  # noqa: F401  (re-exported: owner deconflow.keys)
    HP_DIM,
    VARIANT_DIM,
    cell_key_of_partition,
    cell_of_dims,
    cell_of_partition,
    partition_key_str,
)

# --- run tags ---------------------------------------------------------------------------
SWEEP_TAG = "deconflow/sweep"  # the grid's name: every training run of a sweep carries it
CELL_TAG = "deconflow/cell"  # the cell key of a training run
RESUME_TAG = "deconflow/resume"  # "true": continue from the latest checkpoint
GRAD_ACCUM_TAG = "deconflow/grad_accum"  # out-of-memory retries keep the effective batch
ATTEMPT_TAG = "deconflow/attempt"  # a retry's Dagster-run number for its cell (shown in the UI)
RETRY_OF_TAG = "deconflow/retry_of"  # the failed run a sensor retry follows
# The class that caused this retry. Not FAILURE_CLASS_TAG: that tag names the failure of the
# run that carries it, and a successful retry must not look failed in the tables.
RETRY_CLASS_TAG = "deconflow/retry_class"
FAILURE_CLASS_TAG = "deconflow/failure_class"
FAILURE_REASON_TAG = "deconflow/failure_reason"
STUCK_TAG = "deconflow/stuck"  # set by the watchdog on a run whose job it cancelled as stuck
ALERT_TAG = "deconflow/alert"
SLURM_JOB_TAG = "deconflow/slurm_job_id"
SLURM_STATE_TAG = "deconflow/slurm_state"
PID_TAG = "deconflow/pid"  # a local training process (its process group)
WORKER_TAG = "deconflow/worker"  # host:pid:start of the process waiting on the training
LAUNCHED_BY_TAG = "deconflow/launched_by"  # which command created the run
PARTITION_TAG = "dagster/partition"  # Dagster's own tag on partitioned runs
KIND_TAG = "deconflow/kind"  # what a run does: ANALYSIS_KIND for the analysis refreshes
ANALYSIS_KIND = "analysis"  # runs of the analysis assets (never queued behind training runs)
TRAINING_JOB = "train_cells"  # the job of the training partitions (backfills, retries)
ANALYSIS_JOB = "analyse_sweep"  # the job of the analysis assets

# --- asset names (the analysis tables share their asset's name) ----------------------------
TRAINING_ASSET = "training_run"  # partitioned: one materialization per cell
RUNS_ASSET, RUN_FITS_ASSET = "runs", "run_fits"
HYPOTHESES_ASSET, COMPLETENESS_ASSET = "hypotheses", "completeness"
SWEEP_DB_ASSET, EXPORT_ASSET, REPORT_ASSET = "sweep_db", "export", "sweep_report"

# --- files in a run's work folder (and, for RUN_FILES, its published folder) --------------
SUMMARY = "summary.json"  # written last by a run that ended (completed or diverged)
LEARNING_CURVE = "learning_curve.png"  # the run's picture, drawn by the training process
HEARTBEAT = "heartbeat.json"  # step, epoch, time, pid; rewritten every few seconds
TRAIN_LOG = "train.log"  # the training process's stdout and stderr
LOCAL_PROCESS = "local_process.json"  # pid and identity of a local training process
CHECKPOINT_DIR = "checkpoints"
LATEST_CHECKPOINT = "latest.pt"
PREV_CHECKPOINT = "latest.prev.pt"  # the latest before the current one: the resume fallback
BEST_INDEX = "best.json"
PIPES_DIR = ".pipes"
PIPES_CONTEXT = "context.json"
PIPES_MESSAGES = "messages.jsonl"
STATE_CACHE = ".cell_states.json"  # under the work root: the latest run state per cell
LOCK_DIR = ".locks"  # under the work root: one lock file per cell (one attempt at a time)
SLURM_DIR = "slurm"  # job.sh, job_id, job.json of the SLURM attempt
SLURM_SCRIPT = "job.sh"
SLURM_JOB_ID = "job_id"
# Written just before sbatch: newer than job_id when the orchestrator died between sbatch's
# answer and the job id's write, so the next attempt looks the job up by name instead.
SLURM_SUBMITTING = "submitting"
SLURM_JOB_INFO = "job.json"

# Metric families: one Parquet file each, keyed by run_id and step (SPEC section 3).
FAMILIES: dict[str, list[str]] = {
    "batch_metrics": ["step", "epoch", "loss_nats", "loss_bits", "accuracy", "lr", "weight_decay"],
    "val_metrics": ["step", "epoch", "val_loss", "val_accuracy", "grad_norm", "weight_norm"],
    "curvature_metrics": ["step", "epoch", "lambda_max", "hessian_trace"],
    "noise_metrics": ["step", "epoch", "psd_tail_ratio", "grad_variance", "residual_power"],
}


def family_file(family: str) -> str:
    return f"{family}.parquet"


METRIC_FILE_GLOB = "*_metrics.parquet"


def family_parts_dir(family: str) -> str:
    """While a run trains, each flush appends one ``part-NNNNNN.parquet`` here (O(new rows));
    the run's end compacts them into ``family_file`` (see deconflow.training.metrics_io)."""
    return f"{family}.parts"


# what publishing copies
RUN_FILES = [family_file(f) for f in FAMILIES] + [SUMMARY, TRAIN_LOG, LEARNING_CURVE]

# summary.json fields put on a training_run materialization (by Pipes, or rebuilt from it).
METADATA_FIELDS = (
    "outcome",
    "steps",
    "total_steps",
    "wall_time_s",
    "final_train_loss",
    "final_val_loss",
    "final_val_accuracy",
    "best_val_ce",
    "best_val_epoch",
    "r_squared",
    "knee_epoch",
    "attempts",
    "grad_accum",
    "device",
    "diverged_at_step",
)

# --- run outcomes (summary.json "outcome") ------------------------------------------------
COMPLETED, DIVERGED = "completed", "diverged"

# --- cell statuses (the runs and completeness tables) -------------------------------------
MATERIALIZED, RUNNING, FAILED, MISSING = "materialized", "running", "failed", "missing"
CELL_STATUSES = (MATERIALIZED, DIVERGED, RUNNING, FAILED, MISSING)

# --- Dagster run status -> run state, the single map (keyed by DagsterRunStatus.value) ---
QUEUED, CANCELLED, SUCCEEDED = "queued", "cancelled", "succeeded"
RUN_STATES: dict[str, str] = {
    "QUEUED": QUEUED,
    "NOT_STARTED": QUEUED,
    "STARTING": RUNNING,
    "STARTED": RUNNING,
    "CANCELING": RUNNING,
    "FAILURE": FAILED,
    "CANCELED": CANCELLED,
    "SUCCESS": SUCCEEDED,
}
IN_PROGRESS_STATES = (QUEUED, RUNNING)
ENDED_BADLY_STATES = (FAILED, CANCELLED)
# The same map, as sets of DagsterRunStatus values for run queries.
LIVE_STATUSES = frozenset(k for k, v in RUN_STATES.items() if v in IN_PROGRESS_STATES)
STARTED_STATUSES = frozenset(k for k, v in RUN_STATES.items() if v == RUNNING)  # past the queue
TERMINAL_STATUSES = frozenset(RUN_STATES) - LIVE_STATUSES
ENDED_BADLY_STATUSES = frozenset(k for k, v in RUN_STATES.items() if v in ENDED_BADLY_STATES)


def run_state(status) -> str:
    """The run state of a ``DagsterRunStatus`` (or its value); unknown ones count as running."""
    return RUN_STATES.get(getattr(status, "value", status), RUNNING)


def cell_state(status) -> str:
    """A cell's status from its latest run alone: running | failed | succeeded."""
    state = run_state(status)
    if state in IN_PROGRESS_STATES:
        return RUNNING
    return FAILED if state in ENDED_BADLY_STATES else SUCCEEDED


# --- the cell of a run (keys: deconflow.keys) ----------------------------------------------
def cell_key_of_tags(tags: dict[str, str]) -> str | None:
    """The cell a run belongs to: its cell tag, else its partition tag; None if neither."""
    return tags.get(CELL_TAG) or cell_key_of_partition(tags.get(PARTITION_TAG))
