"""The compute interface: run one training cell somewhere, talking back through Pipes.

Two implementations share everything but launching and watching the process:
``LocalProcessResource`` (a subprocess on this machine, the embedded default) and
``SlurmResource`` (an ``sbatch`` job). Both put the Pipes context and messages files
in the run's work folder, so a job on a cluster node reaches the Dagster run through
the shared filesystem, and a partition looks the same in the UI wherever it ran.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster import PipesFileMessageReader, open_pipes_session

from deconflow import procs
from deconflow.atomic import atomic_write_json
from deconflow.failures import (
    ORCHESTRATOR_LOST,
    UNKNOWN,
    classify_log,
    classify_returncode,
    failure_line,
)
from deconflow.protocol import (
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    LOCAL_PROCESS,
    METADATA_FIELDS,
    PID_TAG,
    PIPES_CONTEXT,
    PIPES_DIR,
    PIPES_MESSAGES,
    SUMMARY,
    TRAIN_LOG,
    WORKER_TAG,
)
from deconflow.sweep import Cell

TRAINING_MODULE = "deconflow.training.run"  # run as `python -m` (never imported here)
TRAINING_ENV = {"PYTHONUNBUFFERED": "1"}  # log lines reach train.log as they are printed


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ('' if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def pipes_env(work: Path) -> dict[str, str]:
    """The Pipes bootstrap variables of a work folder, as the run's session hands them to its
    training (context and messages files in ``work/.pipes``): for a job started before that
    session exists (``start_ahead``)."""
    from dagster_pipes import (
        DAGSTER_PIPES_CONTEXT_ENV_VAR,
        DAGSTER_PIPES_MESSAGES_ENV_VAR,
        PipesDefaultContextLoader,
        PipesDefaultMessageWriter,
        encode_env_var,
    )

    folder = Path(work) / PIPES_DIR
    return {
        DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_env_var(
            {PipesDefaultContextLoader.FILE_PATH_KEY: str(folder / PIPES_CONTEXT)}
        ),
        DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_env_var(
            {
                PipesDefaultMessageWriter.FILE_PATH_KEY: str(folder / PIPES_MESSAGES),
                PipesDefaultMessageWriter.INCLUDE_STDIO_IN_MESSAGES_KEY: False,
            }
        ),
    }


@dataclass
class Outcome:
    """How a launched training process ended."""

    ok: bool
    failure_class: str | None = None
    message: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # e.g. SLURM job id and state


class TrainingFailed(dg.Failure):
    """A training process ended badly; carries its class for the sensors."""


def summary_metadata(summary: dict, work: Path) -> dict:
    """The materialization metadata the training process would have sent (run.py's fields)."""
    meta = {}
    for k in METADATA_FIELDS:
        v = summary.get(k)
        if v is not None and not (isinstance(v, float) and not math.isfinite(v)):
            meta[k] = v
    meta["run_dir"] = str(work)
    return meta


class ComputeResource(dg.ConfigurableResource):
    """Runs ``python -m deconflow.training.run`` for one cell and waits for it."""

    python: str = sys.executable

    def command(self, cell: Cell, profile: str, overrides: dict, work: Path) -> list[str]:
        return [
            self.python,
            "-m",
            TRAINING_MODULE,
            "--key",
            cell.key,
            "--profile",
            profile,
            "--out",
            str(work),
            "--overrides",
            json.dumps(overrides, sort_keys=True),
        ]

    def has_live_attempt(self, cell: Cell, work: Path) -> bool:
        """Whether a job of this cell still runs (its work folder must then be kept)."""
        return False

    def start_ahead(self, cell: Cell, profile: str, overrides: dict, work: Path) -> str | None:
        """Start ``cell``'s training before its Dagster run exists, for the run to take over;
        returns what was started, or None. Only where a queue holds the job until a slot is
        free (SLURM); a local process has no such queue: its slots are the run workers."""
        return None

    def finished_job(self, cell: Cell, work: Path) -> str | None:
        """The id of this cell's last job if it ended well after writing its summary (its
        results are whole in the work folder); None otherwise."""
        return None

    @abstractmethod
    def launch(self, context, cell: Cell, cmd: list[str], env: dict[str, str], work: Path) -> Any:
        """Start the process; returns a handle for ``wait`` and ``cancel``."""

    @abstractmethod
    def wait(self, context, cell: Cell, handle: Any, work: Path) -> Outcome: ...

    @abstractmethod
    def cancel(self, context, handle: Any) -> None: ...

    @abstractmethod
    def cancel_run_job(self, tags: dict[str, str]) -> str:
        """Stop the training a Dagster run started (from its tags); returns what was done.

        The watchdog calls it for a stuck run, from another process than the run's own.
        """

    def _interrupted(self, context, cell: Cell, handle: Any) -> None:
        """The wait was interrupted. Only an explicit terminate (the run is CANCELING, from the
        UI or CLI) cancels the training; an orchestrator that stops or restarts leaves it
        running, and the next attempt of the partition re-attaches to it."""
        run = context.instance.get_run_by_id(context.run.run_id)
        if run is not None and run.status == dg.DagsterRunStatus.CANCELING:
            context.log.warning(f"run terminated: cancelling the training of {cell.key}")
            self.cancel(context, handle)
            return
        reason = (
            f"run worker interrupted (orchestrator stopping?); the training of {cell.key} "
            "keeps running and the next attempt re-attaches to it"
        )
        context.log.warning(reason)
        try:
            context.instance.add_run_tags(
                context.run.run_id,
                {FAILURE_CLASS_TAG: ORCHESTRATOR_LOST, FAILURE_REASON_TAG: reason[:200]},
            )
        except Exception:  # the instance may be going away with the orchestrator
            pass

    def train_cell(
        self,
        context: dg.AssetExecutionContext,
        cell: Cell,
        profile: str,
        overrides: dict,
        work: Path,
    ) -> list:
        """Run the cell to its end; returns the Pipes results (the materialization)."""
        # Which process waits on this run: the watchdog fails the run if it dies.
        context.instance.add_run_tags(context.run.run_id, {WORKER_TAG: procs.identity()})
        attempt_started = time.time() - 1.0
        pipes_dir = work / PIPES_DIR
        pipes_dir.mkdir(parents=True, exist_ok=True)
        for f in pipes_dir.iterdir():
            f.unlink()
        with open_pipes_session(
            context=context,
            context_injector=dg.PipesFileContextInjector(str(pipes_dir / PIPES_CONTEXT)),
            message_reader=PipesFileMessageReader(str(pipes_dir / PIPES_MESSAGES)),
            extras={"cell": cell.key, "profile": profile},
        ) as session:
            env = {**session.get_bootstrap_env_vars(), **TRAINING_ENV}
            cmd = self.command(cell, profile, overrides, work)
            handle = self.launch(context, cell, cmd, env, work)
            try:
                outcome = self.wait(context, cell, handle, work)
            except BaseException:
                self._interrupted(context, cell, handle)
                raise
        if outcome.tags:
            context.instance.add_run_tags(context.run.run_id, outcome.tags)
        if not outcome.ok:
            tail = log_tail(work / TRAIN_LOG)
            cls = outcome.failure_class or classify_log(tail) or UNKNOWN
            # The stored reason is the cause's line from the log (the exception line, SLURM's
            # "DUE TO TIME LIMIT"), else how the process ended ("killed by signal SIGKILL").
            reason = failure_line(tail) or outcome.message
            context.instance.add_run_tags(
                context.run.run_id,
                {FAILURE_CLASS_TAG: cls, FAILURE_REASON_TAG: reason[:250]},
            )
            context.log.error(f"last lines of {work / TRAIN_LOG}:\n{tail}")
            raise TrainingFailed(
                description=f"training of {cell.key} failed [{cls}]: {outcome.message}\n{tail}",
                metadata={"failure_class": cls, "log_tail": tail, **outcome.tags},
            )
        results = list(session.get_results())
        if not any(isinstance(r, dg.MaterializeResult) for r in results):
            # A re-attached training may have reported before this run listened.
            summary = work / SUMMARY
            if summary.exists() and summary.stat().st_mtime >= attempt_started:
                context.log.warning(f"no materialization came through Pipes; using {summary}")
                meta = summary_metadata(json.loads(summary.read_text()), work)
                results.append(dg.MaterializeResult(metadata=meta))
        return results


@dataclass
class AdoptedProcess:
    """A live training process of this cell left by an earlier run worker: waited on by pid."""

    pid: int
    ident: str
    work: Path
    adopted_at: float = field(default_factory=time.time)
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not procs.alive(self.ident):
            # Not our child: its exit status is lost. It ended well if it wrote its summary.
            summary = self.work / SUMMARY
            self.returncode = 0 if summary.exists() else 1
        return self.returncode


class LocalProcessResource(ComputeResource):
    """A subprocess per run on this machine: the default, nothing else to install.

    The process runs in its own session, so stopping the orchestrator (Ctrl-C, SIGTERM) does
    not stop it; ``local_process.json`` in the work folder names it, and the next attempt of
    the partition re-attaches to it instead of starting a second one.
    """

    torch_threads: int = 1  # keep several concurrent runs from fighting over cores
    poll_interval_s: float = 0.5

    def live_process(self, work: Path) -> tuple[int, str] | None:
        """(pid, identity) of this work folder's training process if it still runs."""
        try:
            rec = json.loads((work / LOCAL_PROCESS).read_text())
            pid, ident = int(rec["pid"]), str(rec["identity"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if procs.alive(ident) and TRAINING_MODULE.encode() in procs.cmdline(pid):
            return pid, ident
        return None

    def has_live_attempt(self, cell: Cell, work: Path) -> bool:
        return self.live_process(Path(work)) is not None

    def launch(self, context, cell, cmd, env, work):
        live = self.live_process(work)
        if live is not None:
            pid, ident = live
            context.log.warning(
                f"re-attached to the running training process {pid} of {cell.key} "
                "instead of starting a second one"
            )
            context.instance.add_run_tags(context.run.run_id, {PID_TAG: str(pid)})
            return AdoptedProcess(pid, ident, work)
        log = open(work / TRAIN_LOG, "ab")
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env, "DECONFLOW_TORCH_THREADS": str(self.torch_threads)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        atomic_write_json(
            work / LOCAL_PROCESS, {"pid": proc.pid, "identity": procs.identity(proc.pid)}
        )
        context.log.info(f"started {cell.key} as local process {proc.pid}")
        context.instance.add_run_tags(context.run.run_id, {PID_TAG: str(proc.pid)})
        return proc

    def wait(self, context, cell, handle, work):
        while handle.poll() is None:
            time.sleep(self.poll_interval_s)
        rc = handle.returncode
        if rc == 0:
            return Outcome(ok=True)
        cls, why = classify_returncode(rc, log_tail(work / TRAIN_LOG))
        if not isinstance(handle, subprocess.Popen):  # re-attached: its exit status is lost
            why = f"re-attached training process {handle.pid} ended without its {SUMMARY}"
        return Outcome(ok=False, failure_class=cls, message=why)

    def cancel(self, context, handle):
        if handle.poll() is not None:
            return
        os.killpg(handle.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while handle.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if handle.poll() is None:
            os.killpg(handle.pid, signal.SIGKILL)

    def cancel_run_job(self, tags: dict[str, str]) -> str:
        """SIGKILL the run's process group (SIGTERM would never reach a SIGSTOPped process).

        Only if the pid still is a deconflow training process: pids get reused.
        """
        pid = tags.get(PID_TAG)
        if not pid or not pid.isdigit():
            return "no pid tag: nothing to cancel"
        cmdline = procs.cmdline(int(pid))
        if not cmdline:
            return f"process {pid} is gone"
        if TRAINING_MODULE.encode() not in cmdline:
            return f"pid {pid} is not a training process any more; not killed"
        try:
            os.killpg(int(pid), signal.SIGKILL)  # started with start_new_session: pgid == pid
        except ProcessLookupError:
            return f"process {pid} is gone"
        return f"killed process group {pid}"
