"""Materialize partitions as real Dagster runs from the command line (a CLI backfill), then
the analysis: what ``deconflow materialize`` and ``deconflow demo`` share.

Every run executes in a pool worker; this process only coordinates, so that Ctrl-C (SIGINT,
SIGTERM, SIGHUP) cancels the whole command cleanly:

- no new run starts;
- each run in flight is marked CANCELING (its run id is chosen here, before it starts), then
  its worker is interrupted: the compute resource stops the training (a terminate, not an
  orchestrator loss) and Dagster ends the run CANCELED, which the watchdog never retries;
- whatever is left (a worker that did not stop within ``CANCEL_WAIT_S``, or a second Ctrl-C)
  is killed, its training stopped and its run marked CANCELED: no orphan worker or training.

Workers sit in their own process group (the terminal's Ctrl-C reaches only this process) and
watch their parent: if this process is killed outright, each worker interrupts its own run,
which ends FAILURE (orchestrator lost) while its training keeps going for the watchdog's retry
to re-attach to (restart safety), and the worker exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager

from deconflow import settings
from deconflow.protocol import (
    ANALYSIS_KIND,
    FAILED,
    FAILURE_CLASS_TAG,
    KIND_TAG,
    LAUNCHED_BY_TAG,
    LIVE_STATUSES,
    LOCK_DIR,
    SLURM_JOB_TAG,
    TRAINING_ASSET,
)
from deconflow.sweep import Cell

# The job name dg.materialize gives its runs (Dagster has no public constant for it).
EPHEMERAL_JOB = "__ephemeral_asset_job__"

# Dagster's event log stays complete in the instance; the console shows only warnings.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# How Dagster names the error of a step or run stopped by an interrupt.
INTERRUPTED = "DagsterExecutionInterruptedError"
CANCEL_WAIT_S = 60.0  # for runs in flight to stop after Ctrl-C before they are killed
CANCEL_MESSAGE = "the deconflow command that ran it was interrupted (Ctrl-C): cancelled"
_LIVE = LIVE_STATUSES


def _quiet() -> None:
    import logging

    logging.getLogger("dagster").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=Warning, module="dagster")


# --------------------------------------------------------------------------- pool workers


def _worker_init(parent_pid: int) -> None:
    """A worker: its own process group, default signals, and a watch on its parent."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)

    def watch_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)  # the coordinator is gone: end our run
        time.sleep(120.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True, name="parent-watch").start()


class _NotTheInterruption:
    """A logging filter: the step and run failures that an interrupt causes are the
    cancellation this command announced itself; their stack traces would bury that line.
    They stay in the instance's event log."""

    def filter(self, record) -> bool:
        return INTERRUPTED not in record.getMessage()


def _console_logger():
    """Dagster's console logger for the command's runs, less the interruption's failures."""
    import logging

    import dagster as dg

    @dg.logger(
        {"log_level": dg.Field(str, is_required=False, default_value="WARNING")},
        description="The console of a deconflow command's runs",
    )
    def console(init_context):
        level = logging.getLevelName(init_context.logger_config["log_level"].upper())
        log = logging.Logger("dagster", level=level)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s - dagster - %(levelname)s - %(message)s")
        )
        handler.addFilter(_NotTheInterruption())
        log.addHandler(handler)
        return log

    return console


def _execute(assets: list, run_id: str, tags: dict, partition_key=None):
    """One Dagster run of ``assets`` with a given run id, in this process (a pool worker)."""
    import dagster as dg

    _quiet()
    job = dg.Definitions(
        assets=assets,
        jobs=[dg.define_asset_job(EPHEMERAL_JOB)],
        loggers={"console": _console_logger()},
    ).resolve_job_def(EPHEMERAL_JOB)
    with dg.DagsterInstance.get() as instance:
        return job.execute_in_process(
            run_config=QUIET,
            instance=instance,
            partition_key=partition_key,
            raise_on_error=False,
            tags=tags,
            run_id=run_id,
        )


def _materialize_cell(key: str, launched_by: str, run_id: str) -> tuple[str, bool, str, float]:
    """Worker: one Dagster run materializing one partition on the persistent instance."""
    import dagster as dg

    from deconflow.definitions import defs
    from deconflow.keys import parse_key
    from deconflow.partitions import partition_key

    t0 = time.monotonic()
    asset = defs.get_repository_def().assets_defs_by_key[dg.AssetKey(TRAINING_ASSET)]
    result = _execute(
        [asset], run_id, {LAUNCHED_BY_TAG: launched_by}, partition_key(parse_key(key))
    )
    outcome = FAILED
    if result.success:
        mats = result.asset_materializations_for_node(TRAINING_ASSET)
        if mats and "outcome" in mats[0].metadata:
            outcome = mats[0].metadata["outcome"].value
    return key, result.success, outcome, time.monotonic() - t0


def _analyse(launched_by: str, run_id: str) -> tuple[bool, dict, float]:
    """Worker: every downstream asset and check in one run; checks as plain dicts."""
    from deconflow.definitions import defs

    t0 = time.monotonic()
    repo = defs.get_repository_def()
    downstream = [
        a for k, a in repo.assets_defs_by_key.items() if k.to_user_string() != TRAINING_ASSET
    ]
    result = _execute(
        downstream + list(repo.asset_checks_defs_by_key.values()),
        run_id,
        {LAUNCHED_BY_TAG: launched_by, KIND_TAG: ANALYSIS_KIND},
    )
    checks = {
        e.check_name: {
            "passed": bool(e.passed),
            "description": e.description or "",
            "metadata": {k: v.value for k, v in e.metadata.items()},
        }
        for e in result.get_asset_check_evaluations()
    }
    return result.success, checks, time.monotonic() - t0


# --------------------------------------------------------------------------- the coordinator


class _Interrupts:
    """SIGINT/SIGTERM/SIGHUP while runs execute: the first cancels, a second forces."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.count = 0
        self._old: dict = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            print(
                f"\ndeconflow: {signal.Signals(signum).name}: cancelling the runs in flight, "
                "starting no new one (again to force)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _instance():
    import dagster as dg

    return dg.DagsterInstance.get()


def _finish_cancel(instance, run_id: str) -> None:
    """Make sure an interrupted run ended CANCELED with its training stopped."""
    from deconflow.failures import ORCHESTRATOR_LOST
    from deconflow.resources import compute_from_env

    run = instance.get_run_by_id(run_id)
    if run is None:
        return
    status = run.status.value
    lost = status == "FAILURE" and run.tags.get(FAILURE_CLASS_TAG) == ORCHESTRATOR_LOST
    if status not in _LIVE and not lost:
        return  # it ended by itself (succeeded, failed, or already CANCELED)
    stopped = compute_from_env().cancel_run_job(dict(run.tags))
    instance.report_run_canceled(run, message=f"{CANCEL_MESSAGE}; {stopped}")
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def _cancel_inflight(pool: ProcessPoolExecutor, inflight: dict, intr: _Interrupts) -> None:
    """Mark the runs in flight CANCELING, interrupt their workers, then clean up after them."""
    run_ids = list(inflight.values())
    workers = list(getattr(pool, "_processes", {}) or {})
    with _instance() as instance:
        for run_id in run_ids:
            run = instance.get_run_by_id(run_id)
            if run is not None and run.status.value in _LIVE:
                instance.report_run_canceling(run, message=CANCEL_MESSAGE)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + CANCEL_WAIT_S
    while inflight and time.monotonic() < deadline and intr.count < 2:
        done, _ = wait(list(inflight), timeout=0.5)
        for fut in done:
            inflight.pop(fut, None)
    if inflight:  # a worker that would not stop, or a second Ctrl-C: kill it
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    with _instance() as instance:
        for run_id in run_ids:
            _finish_cancel(instance, run_id)
    print(f"deconflow: cancelled {len(run_ids)} run(s) in flight", file=sys.stderr, flush=True)


def _run_all(
    tasks: list[tuple[Callable, tuple]],
    workers: int,
    on_result: Callable[[object], None],
    on_error: Callable[[tuple, BaseException], None],
) -> bool:
    """Run each task ``fn(*args, run_id)`` in a pool worker, ``workers`` at a time; returns
    whether the command was interrupted (then every run in flight has been cancelled)."""
    import uuid

    pending = list(tasks)
    inflight: dict[Future, str] = {}
    args_of: dict[Future, tuple] = {}
    with (
        _Interrupts() as intr,
        ProcessPoolExecutor(
            max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),)
        ) as pool,
    ):
        try:
            while (pending or inflight) and not intr.count:
                while pending and len(inflight) < workers and not intr.count:
                    fn, args = pending.pop(0)
                    run_id = str(uuid.uuid4())  # what Dagster's own run ids are
                    fut = pool.submit(fn, *args, run_id)
                    inflight[fut], args_of[fut] = run_id, args
                done, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    inflight.pop(fut)
                    try:
                        on_result(fut.result())
                    except Exception as e:  # a worker that died: that run failed
                        on_error(args_of[fut], e)
        finally:
            if intr.count or inflight:
                intr.count = max(intr.count, 1)
                _cancel_inflight(pool, inflight, intr)
    return bool(intr.count)


def _queue_depth(workers: int) -> int:
    """Runs beyond ``workers`` whose SLURM jobs wait in SLURM's queue (0 for local compute):
    SLURM, not this command, then starts the next cell the moment a slot frees."""
    if settings.get("DECONFLOW_COMPUTE") != "slurm":
        return 0
    from deconflow.slurm.queue import slurm_queue_depth

    return slurm_queue_depth(workers)


def _start_ahead(cells: list[Cell], started: dict[str, str]) -> None:
    """SLURM: submit the jobs of the cells whose runs start first before those runs exist, so
    that each job's start-up overlaps its run worker's (``ComputeResource.start_ahead``; the
    run takes the job over); ``started`` gets {cell key: job id}. A cell that another attempt
    holds, or that was attempted here before, is left to its run; so is a refused sbatch
    (its run reports the refusal)."""
    if not cells or settings.get("DECONFLOW_COMPUTE") != "slurm":
        return
    from deconflow.attempt_lock import AttemptInProgress, attempt_lock
    from deconflow.resources import compute_from_env, sweep_from_env
    from deconflow.resources.compute import TrainingFailed
    from deconflow.settings import work_dir
    from deconflow.slurm.commands import SlurmError

    compute, sweep = compute_from_env(), sweep_from_env()
    overrides = sweep.overrides()
    for cell in cells:
        with _interrupts_held():  # a Ctrl-C here acts once the job is in ``started``
            try:
                with attempt_lock(work_dir() / LOCK_DIR, cell.key, "ahead of its run"):
                    job = compute.start_ahead(cell, sweep.profile, overrides, work_dir() / cell.key)
            except (AttemptInProgress, SlurmError, TrainingFailed):
                continue
            if job:
                started[cell.key] = job


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends (then they act as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _Interrupts.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _cancel_ahead(jobs: dict[str, str], finished: set[str]) -> None:
    """After a Ctrl-C: stop the jobs submitted ahead whose runs did not finish (a run that
    took its job over has cancelled it already; scancel of an ended job is harmless)."""
    from deconflow.resources import compute_from_env

    compute = compute_from_env()
    for key, job in jobs.items():
        if key not in finished:
            compute.cancel_run_job({SLURM_JOB_TAG: job})


def materialize_cells(
    cells: list[Cell], workers: int = 2, launched_by: str = "deconflow materialize"
) -> list[str]:
    """Materialize partitions as real Dagster runs, ``workers`` at a time; returns failures.

    Raises KeyboardInterrupt after a Ctrl-C, once every run in flight has been cancelled.
    """
    import dagster as dg
    from tqdm import tqdm

    from deconflow.instance import ensure_pools

    depth = _queue_depth(workers)
    pool = min(len(cells), workers + depth)
    t0 = time.monotonic()
    ahead: dict[str, str] = {}
    failed: list[str] = []
    finished: set[str] = set()
    try:
        _start_ahead(cells[:pool], ahead)
        with dg.DagsterInstance.get() as instance:  # storage made before workers open it
            ensure_pools(instance)
        if pool > workers:
            waiting = pool - workers
            print(f"SLURM queue depth {depth}: up to {waiting} more job(s) wait in its queue")
        with tqdm(total=len(cells), unit="run", file=sys.stdout, dynamic_ncols=True) as bar:

            def done(res) -> None:
                key, ok, outcome, secs = res
                finished.add(key)
                bar.set_postfix_str(f"{key} {outcome} {secs:.0f}s")
                bar.update()
                if not ok:
                    failed.append(key)

            def error(args: tuple, e: BaseException) -> None:
                bar.update()
                failed.append(args[0])
                print(f"deconflow: {args[0]}: worker failed: {e}", file=sys.stderr)

            tasks = [(_materialize_cell, (c.key, launched_by)) for c in cells]
            if _run_all(tasks, pool, done, error):
                raise KeyboardInterrupt
    except KeyboardInterrupt:  # also one before the runs started: no job is left behind
        _cancel_ahead(ahead, finished)
        raise
    print(
        f"trained {len(cells) - len(failed)}/{len(cells)} cells in {time.monotonic() - t0:.0f}s"
        + (f"; failed: {', '.join(sorted(failed))}" if failed else "")
    )
    return failed


def analyse(launched_by: str = "deconflow") -> tuple[bool, dict]:
    """Materialize every downstream asset and check in one run; returns (ok, checks) with
    each check as ``{passed, description, metadata}``. Ctrl-C cancels it (KeyboardInterrupt)."""
    print("analysing: runs, run_fits, hypotheses, completeness, sweep_db, export ...")
    out: list = []
    errors: list[BaseException] = []
    interrupted = _run_all(
        [(_analyse, (launched_by,))], 1, out.append, lambda args, e: errors.append(e)
    )
    if interrupted:
        raise KeyboardInterrupt
    if errors:
        print(f"analysis FAILED: its worker died: {errors[0]}")
        return False, {}
    ok, checks, secs = out[0]
    print(f"analysis {'done' if ok else 'FAILED'} in {secs:.1f}s")
    return ok, checks
