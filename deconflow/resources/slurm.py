"""The SLURM compute resource: one ``sbatch`` job per training run, watched in batches.

``SlurmResource`` is the second implementation of the compute interface
(:mod:`deconflow.resources.compute`). It writes a job script into the run's work folder,
submits it with ``sbatch --parsable`` and waits for the job's end state. The training
process talks to the Dagster run through Dagster Pipes files in the same work folder, which
must therefore live on a filesystem that the cluster's nodes and the orchestrator share.

Why it looks the way it does:

- **Batched polling.** Waiting runs never ask SLURM about their own job. One
  :class:`SlurmPoller` thread per process asks ``squeue`` once per interval for every job the
  process waits on, and ``sacct`` (``scontrol`` when accounting is missing) once for the jobs that
  left the queue. With Dagster's default run launcher every run is its own process, so the
  ``squeue`` answer is also shared between processes through a small cache file (one
  ``squeue --user`` listing serves every run of this user on the host): 200 runs in flight cost
  about one ``squeue`` per interval, not 200.
- **Re-attach, never duplicate.** The job name is ``<prefix>-<cell key>``, unique per partition.
  Before submitting, a live job with exactly that name whose log is this work folder's log is
  adopted instead (under a file lock, so two runs of one partition cannot both submit). Its
  Pipes files sit at the same paths, so its messages still reach the new run; if its
  materialization message was lost while no orchestrator listened, the materialization is
  rebuilt from the run's ``summary.json``. A ``submitting`` mark is written before sbatch, so
  a job whose id was never recorded (the orchestrator died in between) is still found, by
  its exact name in SLURM's accounting.
- **No shell injection.** Every config value and the cell key is validated against a strict
  pattern and quoted before it reaches the script or a command line; commands run without a
  shell. ``setup_lines`` are the exception by design: they are the user's own shell (module
  loads, venv activation, container exec) and are written verbatim.
- **Checkpoint before the kill.** ``--signal=B:USR1@<signal_before_s>`` lets the training exit
  cleanly with its checkpoint intact; the next attempt resumes from ``checkpoints/latest.pt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import typing
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import dagster as dg

from deconflow.atomic import atomic_write_text
from deconflow.failures import (
    KILLED_BY_SIGNAL,
    SUBMIT_REJECTED,
    TIMEOUT,
    UNKNOWN,
    classify_slurm_state,
    signal_name,
)
from deconflow.protocol import (
    PIPES_DIR,
    PIPES_MESSAGES,
    SLURM_DIR,
    SLURM_JOB_ID,
    SLURM_JOB_INFO,
    SLURM_JOB_TAG,
    SLURM_SCRIPT,
    SLURM_STATE_TAG,
    SLURM_SUBMITTING,
    SUMMARY,
    TRAIN_LOG,
)
from deconflow.resources.compute import (
    TRAINING_ENV,
    ComputeResource,
    Outcome,
    TrainingFailed,
    log_tail,
    pipes_env,
    summary_metadata,
)
from deconflow.slurm import commands
from deconflow.slurm.commands import SlurmError, flock
from deconflow.slurm.poller import JobState, SlurmPoller, get_poller
from deconflow.slurm.queue import slurm_queue_depth
from deconflow.slurm.script import (
    USR1_EXIT,
    JobOptions,
    SlurmConfigError,
    check_name,
    render_script,
)
from deconflow.sweep import Cell

__all__ = ["SlurmConfigError", "SlurmError", "SlurmJob", "SlurmResource", "summary_metadata"]

# How long a job submitted ahead of its run waits for the run's Pipes files before it trains
# without them (its results are then taken from summary.json).
AHEAD_PIPES_WAIT_S = 300.0
SUBMIT_LOCK = ".submit.lock"  # in work/slurm/: one submission of a partition at a time


@dataclass
class SlurmJob:
    """The handle ``launch`` returns: which job, and whether it was adopted."""

    job_id: str
    name: str
    adopted: bool = False
    submitted_at: float = field(default_factory=time.time)


def job_option_fields(options: type = JobOptions) -> type[ComputeResource]:
    """A compute-resource base class with one config field per field of ``options`` (same
    name, type and default): :class:`JobOptions` is the one list of SLURM job fields, and a
    field added there is a setting of :class:`SlurmResource` (and of ``slurm.toml``)."""
    hints = typing.get_type_hints(options)
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {"__module__": __name__, "__annotations__": annotations}
    for f in fields(options):
        annotations[f.name] = hints[f.name]
        namespace[f.name] = f.default if f.default is not MISSING else f.default_factory()
    namespace["__doc__"] = f"The fields of {options.__name__}, as resource config."
    return type(f"{options.__name__}Fields", (ComputeResource,), namespace)


class SlurmResource(job_option_fields(JobOptions)):
    """Runs each training cell as one SLURM batch job (see the module docstring).

    The sbatch fields (partition, account, gres, memory, time limit, setup lines...) are
    :class:`~deconflow.slurm.script.JobOptions`' fields; the rest is how the job is watched.
    """

    poll_interval_s: float = 5.0
    slurm_conf: str | None = None  # SLURM_CONF for the client commands; default: environment
    job_name_prefix: str = "dcf"
    cancel_wait_s: float = 15.0
    # Folder of the squeue cache shared by this host's processes; None: the temp dir,
    # "" turns sharing off (one squeue per process and interval).
    poll_cache_dir: str | None = None

    # ---- pure helpers (testable without a cluster)
    def options(self) -> JobOptions:
        """This resource's sbatch options as plain data (validated by ``check``)."""
        return JobOptions(**{f.name: getattr(self, f.name) for f in fields(JobOptions)})

    def check_config(self) -> None:
        """Reject any config value that could break out of the script or a command line."""
        check_name("job_name_prefix", self.job_name_prefix)
        self.options().check()
        slurm_queue_depth(1)  # a bad DECONFLOW_SLURM_QUEUE_DEPTH: refused before any submit
        if self.poll_interval_s <= 0:
            raise SlurmConfigError(
                f"SlurmResource.poll_interval_s must be > 0: {self.poll_interval_s}"
            )
        if self.slurm_conf is not None and "\0" in self.slurm_conf:
            raise SlurmConfigError("SlurmResource.slurm_conf may not contain NUL bytes")

    def gres(self) -> str | None:
        return self.options().gres()

    def job_name(self, cell: Cell) -> str:
        """``<prefix>-<cell key>``: unique per partition, so re-attachment can find it."""
        return (
            check_name("job_name_prefix", self.job_name_prefix)
            + "-"
            + check_name("cell key", cell.key)
        )

    def client_env(self) -> dict[str, str]:
        """The environment of sbatch/squeue/sacct/scancel (SLURM_CONF from config if set)."""
        env = dict(os.environ)
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        return env

    def render_script(self, cell: Cell, cmd: Sequence[str], env: dict[str, str], work: Path) -> str:
        """The batch script: validated #SBATCH options, quoted exports, setup lines, exec."""
        return render_script(self.options(), self.job_name(cell), cell.key, cmd, env, work)

    # ---- cluster side
    def _poller(self) -> SlurmPoller:
        if self.poll_cache_dir == "":
            cache = None
        else:
            conf = self.client_env().get("SLURM_CONF", "")
            tag = hashlib.sha1(conf.encode()).hexdigest()[:12]
            folder = Path(self.poll_cache_dir or tempfile.gettempdir())
            cache = folder / f"deconflow-squeue-{os.getuid()}-{tag}.json"
        return get_poller(self.client_env(), self.poll_interval_s, cache)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.check_config()  # fail the run at start, before anything is submitted

    def find_live_job(self, name: str, work: Path) -> list[tuple[str, str]]:
        """Live jobs that are this partition's: exact name, and this work folder's log.

        A job whose id is in ``work/slurm/job_id`` is ours; any other job of that name must
        log to this work folder (another deployment may run the same cell elsewhere).
        """
        env = self.client_env()
        recorded = _read_text(Path(work) / SLURM_DIR / SLURM_JOB_ID)
        log = str(Path(work).resolve() / TRAIN_LOG)
        found = [
            (job_id, state)
            for job_id, state in commands.live_jobs_named(name, env)
            if job_id == recorded or commands.job_stdout(job_id, env) == log
        ]
        # The recorded job first, then the oldest.
        found.sort(key=lambda js: (js[0] != recorded, int(js[0].split("_")[0])))
        return found

    def has_live_attempt(self, cell: Cell, work: Path) -> bool:
        """Whether this partition's job still runs, so its work folder must be kept.

        For the asset to ask before it clears the work folder of a fresh attempt: an
        orchestrator that died mid-job leaves a job that the next materialization re-attaches to.
        """
        return bool(self.find_live_job(self.job_name(cell), Path(work)))

    def finished_job(self, cell: Cell, work: Path) -> str | None:
        """The recorded job of this partition if SLURM says it COMPLETED and its summary was
        written after it was submitted: an orchestrator that stopped while it ran never
        reported it, and the next attempt reports these results instead of training again."""
        job_id, submitted = self._last_submission(cell, Path(work) / SLURM_DIR)
        try:
            fresh = (Path(work) / SUMMARY).stat().st_mtime >= submitted
        except OSError:
            return None
        if not job_id or not fresh:
            return None
        st = self._poller().end_states([job_id]).get(job_id)
        return job_id if st is not None and st.base_state == "COMPLETED" else None

    def _last_submission(self, cell: Cell, sdir: Path) -> tuple[str, float]:
        """(job id, when) of this partition's last sbatch; ("", 0) when there is none.

        The id is written once sbatch answers. An orchestrator killed in between leaves only
        the ``submitting`` mark written before sbatch: the job is then found by its exact
        name in SLURM's accounting since that mark (no accounting: none is found, as before).
        """
        recorded, mark = _mtime(sdir / SLURM_JOB_ID), _mtime(sdir / SLURM_SUBMITTING)
        if mark is not None and (recorded is None or mark > recorded):
            try:
                jobs = commands.jobs_named_since(self.job_name(cell), mark, self.client_env())
            except SlurmError:
                jobs = []
            return (jobs[-1][0], mark) if jobs else ("", 0.0)
        return _read_text(sdir / SLURM_JOB_ID), recorded or 0.0

    def submit(self, script: Path) -> str:
        """``sbatch --parsable``; returns the job id.

        A refusal (invalid partition, account, QOS, gres...) fails the run as
        ``submit_rejected`` with SLURM's own message: the watchdog alerts rather than
        resubmitting the same script. A controller that does not answer is not a refusal.
        """
        try:
            return commands.submit(script, self.client_env())
        except SlurmError as e:
            msg = str(e)
            if _TRANSIENT_SUBMIT.search(msg):
                raise
            raise SubmitRejected(
                description=f"{SUBMIT_REJECTED}: sbatch refused the job: {msg}",
                metadata={"failure_class": SUBMIT_REJECTED, "sbatch_error": msg},
            ) from None

    def launch(self, context, cell, cmd, env, work) -> SlurmJob:
        """Adopt this partition's live job if there is one, else submit a new one."""
        work = Path(work).resolve()
        script_text = self.render_script(cell, cmd, env, work)
        name = self.job_name(cell)
        sdir = work / SLURM_DIR
        sdir.mkdir(parents=True, exist_ok=True)
        with flock(sdir / SUBMIT_LOCK):
            live = self.find_live_job(name, work)
            for extra_id, _ in live[1:]:  # never more than one live job per partition
                context.log.warning(f"cancelling duplicate SLURM job {extra_id} of {name}")
                commands.scancel(extra_id, self.client_env())
            done = None if live else self.finished_job(cell, work)
            if live and live[0][0] == _submitted_ahead(work):
                job = SlurmJob(live[0][0], name)
                state = live[0][1]
                context.log.info(
                    f"took over SLURM job {job.job_id} ({state}) of {cell.key}: the deconflow "
                    "command submitted it ahead of this run"
                )
            elif live:
                job = SlurmJob(live[0][0], name, adopted=True)
                state = live[0][1]
                atomic_write_text(sdir / SLURM_JOB_ID, job.job_id + "\n")
                context.log.warning(
                    f"re-attached to SLURM job {job.job_id} ({state}) of {cell.key} "
                    "instead of submitting a new one"
                )
            elif done:
                # Its job_id file is left as it is: the summary stays newer than it, which is
                # how the results are taken from summary.json (no Pipes message will come).
                job = SlurmJob(done, name, adopted=True)
                context.log.warning(
                    f"SLURM job {done} of {cell.key} completed while no run was waiting on it: "
                    "reporting its results instead of training again"
                )
                self._record(work, job, "COMPLETED")
                _add_tags(context, {SLURM_JOB_TAG: done, SLURM_STATE_TAG: "COMPLETED"})
                self._poller().track(done, self.poll_interval_s)
                return job
            else:
                job = self._sbatch(sdir, script_text, name)
                state = "PENDING"
                context.log.info(
                    f"submitted {cell.key} as SLURM job {job.job_id} "
                    f"(partition {self.partition or 'default'}, gres {self.gres() or 'none'})"
                )
        self._record(work, job, state)
        _add_tags(context, {SLURM_JOB_TAG: job.job_id, SLURM_STATE_TAG: state})
        self._poller().track(job.job_id, self.poll_interval_s)
        return job

    def start_ahead(self, cell: Cell, profile: str, overrides: dict, work: Path) -> str | None:
        """Submit the job of a cell never attempted here, before its Dagster run exists.

        ``deconflow materialize`` calls it while its run workers are still starting, so the
        job's start-up (allocation, interpreter, torch) overlaps theirs. The job waits for the
        run's Pipes files (``--pipes-wait-s``), and the run's ``launch`` takes it over instead
        of submitting. Only without a work folder: an earlier attempt's folder is the run's to
        judge (resume, re-attach, report or clear). Returns the job id, or None.
        """
        work = Path(work)
        if work.exists():
            return None
        sdir = work / SLURM_DIR
        sdir.mkdir(parents=True)
        cmd = self.command(cell, profile, overrides, work)
        cmd += ["--pipes-wait-s", f"{AHEAD_PIPES_WAIT_S:g}"]
        script = self.render_script(cell, cmd, {**pipes_env(work), **TRAINING_ENV}, work.resolve())
        with flock(sdir / SUBMIT_LOCK):
            job = self._sbatch(sdir, script, self.job_name(cell))
        self._record(work, job, "PENDING", ahead=True)
        return job.job_id

    def _sbatch(self, sdir: Path, script: str, name: str) -> SlurmJob:
        """Under the caller's submit lock: the script, the ``submitting`` mark, sbatch, and
        the job id recorded."""
        atomic_write_text(sdir / SLURM_SCRIPT, script, mode=0o700)
        atomic_write_text(sdir / SLURM_SUBMITTING, f"{time.time()}\n")
        job = SlurmJob(self.submit(sdir / SLURM_SCRIPT), name)
        atomic_write_text(sdir / SLURM_JOB_ID, job.job_id + "\n")
        return job

    def wait(self, context, cell, handle: SlurmJob, work) -> Outcome:
        """Block on the shared poller's table until the job ends; map its end state."""
        poller = self._poller()
        poller.track(handle.job_id, self.poll_interval_s)
        last: JobState | None = None
        last_error: str | None = None
        finished = False
        try:
            while True:
                # Once the training has reported its end, look every 0.2 s: its job leaves
                # the queue within a moment, and the next cell's run is waiting on this one.
                st = poller.wait_change(handle.job_id, last, timeout=0.2 if finished else 1.0)
                if st is not None and not st.final:
                    finished = finished or _training_finished(Path(work), handle)
                    if finished:
                        poller.poke()  # don't wait out the poll interval
                if poller.last_error != last_error:
                    last_error = poller.last_error
                    if last_error:
                        context.log.warning(f"SLURM polling failed (will retry): {last_error}")
                if st is None or st == last:
                    continue
                if last is None or st.base_state != last.base_state:
                    if not st.final:  # the end state is reported (and tagged) by train_cell
                        why = f" ({st.reason})" if st.reason and st.reason != "None" else ""
                        context.log.info(f"SLURM job {handle.job_id} is {st.state}{why}")
                        _add_tags(context, {SLURM_STATE_TAG: st.base_state})
                    self._record(work, handle, st.base_state, st)
                last = st
                if st.final:
                    break
        finally:
            poller.untrack(handle.job_id)
        return self._outcome(context, handle, last, Path(work))

    def _outcome(self, context, job: SlurmJob, st: JobState, work: Path) -> Outcome:
        tags = {SLURM_JOB_TAG: job.job_id, SLURM_STATE_TAG: st.base_state}
        cls = classify_slurm_state(st.state, log_tail(work / TRAIN_LOG))
        if cls is None:
            context.log.info(f"SLURM job {job.job_id} ended {st.base_state}")
            return Outcome(ok=True, tags=tags)
        signum = _exit_signal(st)
        if cls == UNKNOWN and signum and not _exited_on_usr1(st):
            cls = KILLED_BY_SIGNAL
            return Outcome(
                ok=False,
                failure_class=cls,
                message=f"SLURM job {job.job_id} ended {st.base_state} (training process "
                f"killed by signal {signal_name(signum)})",
                tags=tags,
            )
        if st.base_state == "TIMEOUT":
            detail = f"time limit {self.time_limit or 'of the partition'}"
        elif st.base_state == "FAILED" and self.signal_before_s and _exited_on_usr1(st):
            cls = TIMEOUT
            detail = (
                f"exit {USR1_EXIT}: stopped by SIGUSR1 {self.signal_before_s}s before the time "
                f"limit {self.time_limit or 'of the partition'}; resumes from its checkpoint"
            )
        else:
            bits = []
            if st.exit_code:
                bits.append(f"exit code {st.exit_code}")
            if st.reason and st.reason != "None":
                bits.append(f"reason {st.reason}")
            detail = ", ".join(bits) or "no detail"
        return Outcome(
            ok=False,
            failure_class=cls or UNKNOWN,
            message=f"SLURM job {job.job_id} ended {st.base_state} ({detail})",
            tags=tags,
        )

    def cancel(self, context, handle: SlurmJob) -> None:
        """``scancel`` the job and wait (briefly) until it has left the queue."""
        env = self.client_env()
        err = commands.scancel(handle.job_id, env)
        if err:
            context.log.warning(err)
        commands.wait_gone(handle.job_id, env, self.cancel_wait_s)
        context.log.warning(f"cancelled SLURM job {handle.job_id}")
        try:
            _add_tags(context, {SLURM_STATE_TAG: "CANCELLED"})
        except Exception:  # the run may already be gone from the instance's point of view
            pass

    def cancel_run_job(self, tags: dict[str, str]) -> str:
        """Stop the training job of a run (the watchdog's stuck-run action): ``scancel``."""
        job_id = tags.get(SLURM_JOB_TAG)
        if not job_id:
            return "no SLURM job id tag: nothing to cancel"
        return commands.scancel(job_id, self.client_env()) or f"scancel {job_id}"

    # ---- results
    def train_cell(self, context, cell, profile, overrides, work) -> list:
        """The shared Pipes flow, plus SLURM metadata and the summary.json fallback."""
        results = super().train_cell(context, cell, profile, overrides, work)
        info = _read_json(Path(work) / SLURM_DIR / SLURM_JOB_INFO)
        if info.get("adopted"):
            context.log.info(
                f"SLURM job {info.get('job_id')} was re-attached: it opened Dagster Pipes under "
                "the earlier run, so a Pipes warning about missing messages is expected"
            )
        return [self._complete(r, info, Path(work), context) for r in results]

    def _complete(self, result: Any, info: dict, work: Path, context) -> Any:
        """Add the job id/state; rebuild the metadata from summary.json if Pipes said nothing."""
        if not isinstance(result, dg.MaterializeResult):
            return result
        meta = dict(result.metadata or {})
        if "outcome" not in meta:
            summary_path = work / SUMMARY
            id_path = work / SLURM_DIR / SLURM_JOB_ID
            fresh = (
                summary_path.exists()
                and id_path.exists()
                and summary_path.stat().st_mtime >= id_path.stat().st_mtime
            )
            if fresh:
                context.log.warning(
                    "no materialization came through Pipes (the job was re-attached after its "
                    f"message was written); using {summary_path}"
                )
                meta.update(summary_metadata(json.loads(summary_path.read_text()), work))
        if info.get("job_id"):
            meta["slurm_job_id"] = info["job_id"]
            meta["slurm_state"] = info.get("state", "")
            meta["slurm_adopted"] = bool(info.get("adopted"))
        return dg.MaterializeResult(
            asset_key=result.asset_key,
            metadata=meta,
            check_results=result.check_results,
            data_version=result.data_version,
            tags=result.tags,
        )

    def _record(
        self,
        work: Path,
        job: SlurmJob,
        state: str,
        st: JobState | None = None,
        ahead: bool = False,
    ) -> None:
        """``work/slurm/job.json``: the job as the run last saw it (read by train_cell); a job
        submitted ahead of its run says so until a run takes it over."""
        info = {"job_id": job.job_id, "name": job.name, "adopted": job.adopted, "state": state}
        if ahead:
            info["ahead"] = True
        if st is not None:
            info["last"] = asdict(st)
        atomic_write_text(Path(work) / SLURM_DIR / SLURM_JOB_INFO, json.dumps(info, indent=2))


def _submitted_ahead(work: Path) -> str:
    """The id of the job submitted ahead of its run (``start_ahead``) that no run has taken
    over yet; '' if none."""
    info = _read_json(Path(work) / SLURM_DIR / SLURM_JOB_INFO)
    return str(info.get("job_id", "")) if info.get("ahead") else ""


def _training_finished(work: Path, job: SlurmJob) -> bool:
    """The training process closed its Pipes session (or wrote its summary) for this job."""
    try:
        with open(work / PIPES_DIR / PIPES_MESSAGES, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2048))
            lines = f.read().splitlines()
        if lines and b'"method": "closed"' in lines[-1]:
            return True
    except OSError:
        pass
    try:
        summary = (work / SUMMARY).stat().st_mtime
        return summary >= (work / SLURM_DIR / SLURM_JOB_ID).stat().st_mtime
    except OSError:
        return False


class SubmitRejected(TrainingFailed):
    """sbatch refused the job; the description carries SLURM's message."""


# sbatch errors that say nothing about the job itself: the controller did not answer.
_TRANSIENT_SUBMIT = re.compile(
    r"Socket timed out|Unable to contact slurm controller|Connection refused|Zero Bytes were "
    r"transmitted|Resource temporarily unavailable|did not answer within|not found: is SLURM",
    re.IGNORECASE,
)


def _exit_signal(st: JobState) -> int:
    """The signal in a job's ``<status>:<signal>`` exit code (0 if none)."""
    _, _, sig = (st.exit_code or "").partition(":")
    if sig.isdigit() and int(sig):
        return int(sig)
    return 0


def _exited_on_usr1(st: JobState) -> bool:
    """The training's USR1 handler exits 128+USR1 (138). scontrol shows ``138:0``; SLURM
    22.05's sacct shows such an exit as ``10:0``, and our training never exits 10 itself."""
    status = st.exit_code.split(":")[0]
    return status == str(USR1_EXIT) or (st.source == "sacct" and status == str(USR1_EXIT - 128))


def _add_tags(context, tags: dict[str, str]) -> None:
    context.instance.add_run_tags(context.run.run_id, tags)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
