"""``training_run``: one partition per grid cell, materialized by a real training run."""

import shutil

import dagster as dg

from deconflow.assets.run_metadata import learning_curve_metadata, public_run_metadata
from deconflow.attempt_lock import AttemptInProgress, attempt_lock
from deconflow.partitions import cell_for, partitions_def
from deconflow.protocol import (
    CELL_TAG,
    GRAD_ACCUM_TAG,
    LOCK_DIR,
    RESUME_TAG,
    SLURM_DIR,
    SLURM_JOB_ID,
    SLURM_JOB_TAG,
    SUMMARY,
    SWEEP_TAG,
    TRAINING_ASSET,
)
from deconflow.resources.compute import ComputeResource
from deconflow.resources.sweep_settings import SweepSettings
from deconflow.settings import runs_dir, work_dir
from deconflow.sweep import Grid
from deconflow.warehouse.publish import publish_run


def _reported(context, job_id: str) -> bool:
    """Whether the partition's latest materialization came from the run that waited on
    ``job_id`` (then a new run is a rerun and trains again)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=context.asset_key, asset_partitions=[context.partition_key]
        ),
        limit=1,
    ).records
    if not records:
        return False
    run = context.instance.get_run_by_id(records[0].run_id)
    return run is not None and run.tags.get(SLURM_JOB_TAG) == job_id


def _keep_work(context, compute: ComputeResource, cell, work) -> bool:
    """A training still running (re-attach), or one that finished while no run waited on it
    and whose results were never reported (report them): its work folder is kept."""
    if compute.has_live_attempt(cell, work):
        return True
    done = compute.finished_job(cell, work)
    return done is not None and not _reported(context, done)


def _attempt(context, compute: ComputeResource, sweep: SweepSettings, cell, work, overrides):
    """One attempt, under the partition's lock: keep the work folder for a resume, a live
    training or an unreported finished one, else start from a clean one."""
    fresh = context.run.tags.get(RESUME_TAG) != "true"
    if fresh and work.exists() and not _keep_work(context, compute, cell, work):
        context.log.info(f"fresh attempt: clearing {work}")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return compute.train_cell(context, cell, sweep.profile, overrides, work)


def build_training_run(grid: Grid) -> dg.AssetsDefinition:
    @dg.asset(
        name=TRAINING_ASSET,
        partitions_def=partitions_def(grid),
        group_name="training",
        kinds={"pytorch"},
        description=(
            "One ResNet-18 training of a grid cell (variant x lr x weight decay x seed). "
            "Metrics land as Parquet in `data/runs/<cell key>/`; a diverged run is a result. "
            "Each materialization shows the run's learning curve."
        ),
    )
    def training_run(
        context: dg.AssetExecutionContext, compute: ComputeResource, sweep: SweepSettings
    ):
        cell = cell_for(context.partition_key)
        tags = context.run.tags
        context.instance.add_run_tags(
            context.run.run_id, {SWEEP_TAG: grid.name, CELL_TAG: cell.key}
        )
        overrides = sweep.overrides()
        if GRAD_ACCUM_TAG in tags:
            overrides["grad_accum"] = int(tags[GRAD_ACCUM_TAG])
        work = work_dir() / cell.key
        try:
            with attempt_lock(work_dir() / LOCK_DIR, cell.key, context.run.run_id):
                results = _attempt(context, compute, sweep, cell, work, overrides)
        except AttemptInProgress as e:
            raise dg.Failure(str(e)) from None
        if not (work / SUMMARY).exists():
            raise dg.Failure(f"training of {cell.key} ended without a {SUMMARY} in {work}")
        published = publish_run(work, runs_dir())
        extra = {"run_dir": dg.MetadataValue.path(str(published)), "cell": cell.key}
        extra.update(learning_curve_metadata(published))
        job_id = work / SLURM_DIR / SLURM_JOB_ID
        if job_id.exists():
            extra["slurm_job_id"] = job_id.read_text().strip()
        mats = [r for r in results if isinstance(r, dg.MaterializeResult)]
        if not mats:
            raise dg.Failure(f"training of {cell.key} reported no materialization")
        return dg.MaterializeResult(
            metadata=public_run_metadata({**(mats[-1].metadata or {}), **extra})
        )

    return training_run
