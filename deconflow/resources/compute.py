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
from deconflow.sweep import Cell

LOG_NAME = "train.log"


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
            "deconflow.training.run",
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

    def train_cell(
        self,
        context: dg.AssetExecutionContext,
        cell: Cell,
        profile: str,
        overrides: dict,
        work: Path,
    ) -> list:
        """Run the cell to its end; returns the Pipes results (the materialization)."""
        pipes_dir = work / ".pipes"
        pipes_dir.mkdir(parents=True, exist_ok=True)
        for f in pipes_dir.iterdir():
            f.unlink()
        with open_pipes_session(
            context=context,
            context_injector=PipesFileContextInjector(str(pipes_dir / "context.json")),
            message_reader=PipesFileMessageReader(str(pipes_dir / "messages.jsonl")),
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
            context.instance.add_run_tags(context.run_id, outcome.tags)
        if not outcome.ok:
            tail = log_tail(work / LOG_NAME)
            cls = outcome.failure_class or classify_log(tail) or UNKNOWN
            context.instance.add_run_tags(
                context.run_id,
                {"deconflow/failure_class": cls, "deconflow/failure_reason": outcome.message[:200]},
            )
            context.log.error(f"last lines of {work / LOG_NAME}:\n{tail}")
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
        log = open(work / LOG_NAME, "ab")
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env, "DECONFLOW_TORCH_THREADS": str(self.torch_threads)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        context.log.info(f"started {cell.key} as local process {proc.pid}")
        context.instance.add_run_tags(context.run_id, {"deconflow/pid": str(proc.pid)})
        return proc

    def wait(self, context, cell, handle, work):
        while handle.poll() is None:
            time.sleep(self.poll_interval_s)
        rc = handle.returncode
        if rc == 0:
            return Outcome(ok=True)
        why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        cls = classify_log(log_tail(work / LOG_NAME))
        return Outcome(ok=False, failure_class=cls, message=f"process ended with {why}")

    def cancel(self, context, handle):
        if handle.poll() is None:
            os.killpg(handle.pid, signal.SIGTERM)
            try:
                handle.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(handle.pid, signal.SIGKILL)
