"""The compute interface: run one training cell somewhere, talking back through Pipes.

Two implementations share everything but launching and watching the process:
``LocalProcessResource`` (a subprocess on this machine, the embedded default) and
``SlurmResource`` (an ``sbatch`` job). Both put the Pipes context and messages files
in the run's work folder, so a job on a cluster node reaches the Dagster run through
the shared filesystem, and a partition looks the same in the UI wherever it ran.
"""

from __future__ import annotations

import json
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
from dagster._core.pipes.utils import PipesFileContextInjector

from deconflow.failures import UNKNOWN, classify_log
from deconflow.protocol import (
    FAILURE_CLASS_TAG,
    FAILURE_REASON_TAG,
    PID_TAG,
    PIPES_CONTEXT,
    PIPES_DIR,
    PIPES_MESSAGES,
    TRAIN_LOG,
)
from deconflow.sweep import Cell

TRAINING_MODULE = "deconflow.training.run"  # run as `python -m` (never imported here)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ('' if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


@dataclass
class Outcome:
    """How a launched training process ended."""

    ok: bool
    failure_class: str | None = None
    message: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # e.g. SLURM job id and state


class TrainingFailed(dg.Failure):
    """A training process ended badly; carries its class for the sensors."""


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

    def train_cell(
        self,
        context: dg.AssetExecutionContext,
        cell: Cell,
        profile: str,
        overrides: dict,
        work: Path,
    ) -> list:
        """Run the cell to its end; returns the Pipes results (the materialization)."""
        pipes_dir = work / PIPES_DIR
        pipes_dir.mkdir(parents=True, exist_ok=True)
        for f in pipes_dir.iterdir():
            f.unlink()
        with open_pipes_session(
            context=context,
            context_injector=PipesFileContextInjector(str(pipes_dir / PIPES_CONTEXT)),
            message_reader=PipesFileMessageReader(str(pipes_dir / PIPES_MESSAGES)),
            extras={"cell": cell.key, "profile": profile},
        ) as session:
            env = {**session.get_bootstrap_env_vars(), "PYTHONUNBUFFERED": "1"}
            cmd = self.command(cell, profile, overrides, work)
            handle = self.launch(context, cell, cmd, env, work)
            try:
                outcome = self.wait(context, cell, handle, work)
            except BaseException:
                # The Dagster run was terminated (or the orchestrator is shutting down).
                context.log.warning(f"cancelling the training of {cell.key}")
                self.cancel(context, handle)
                raise
        if outcome.tags:
            context.instance.add_run_tags(context.run.run_id, outcome.tags)
        if not outcome.ok:
            tail = log_tail(work / TRAIN_LOG)
            cls = outcome.failure_class or classify_log(tail) or UNKNOWN
            context.instance.add_run_tags(
                context.run.run_id,
                {FAILURE_CLASS_TAG: cls, FAILURE_REASON_TAG: outcome.message[:200]},
            )
            context.log.error(f"last lines of {work / TRAIN_LOG}:\n{tail}")
            raise TrainingFailed(
                description=f"training of {cell.key} failed [{cls}]: {outcome.message}\n{tail}",
                metadata={"failure_class": cls, "log_tail": tail, **outcome.tags},
            )
        return list(session.get_results())


class LocalProcessResource(ComputeResource):
    """A subprocess per run on this machine: the default, nothing else to install."""

    torch_threads: int = 1  # keep several concurrent runs from fighting over cores
    poll_interval_s: float = 0.5

    def launch(self, context, cell, cmd, env, work):
        log = open(work / TRAIN_LOG, "ab")
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env, "DECONFLOW_TORCH_THREADS": str(self.torch_threads)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        context.log.info(f"started {cell.key} as local process {proc.pid}")
        context.instance.add_run_tags(context.run.run_id, {PID_TAG: str(proc.pid)})
        return proc

    def wait(self, context, cell, handle, work):
        while handle.poll() is None:
            time.sleep(self.poll_interval_s)
        rc = handle.returncode
        if rc == 0:
            return Outcome(ok=True)
        why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        cls = classify_log(log_tail(work / TRAIN_LOG))
        return Outcome(ok=False, failure_class=cls, message=f"process ended with {why}")

    def cancel(self, context, handle):
        if handle.poll() is None:
            os.killpg(handle.pid, signal.SIGTERM)
            try:
                handle.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(handle.pid, signal.SIGKILL)

    def cancel_run_job(self, tags: dict[str, str]) -> str:
        """SIGKILL the run's process group (SIGTERM would never reach a SIGSTOPped process).

        Only if the pid still is a deconflow training process: pids get reused.
        """
        pid = tags.get(PID_TAG)
        if not pid or not pid.isdigit():
            return "no pid tag: nothing to cancel"
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return f"process {pid} is gone"
        if TRAINING_MODULE.encode() not in cmdline:
            return f"pid {pid} is not a training process any more; not killed"
        try:
            os.killpg(int(pid), signal.SIGKILL)  # started with start_new_session: pgid == pid
        except ProcessLookupError:
            return f"process {pid} is gone"
        return f"killed process group {pid}"
