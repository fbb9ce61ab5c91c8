"""sbatch option validation (no Dagster): nothing unsafe reaches SLURM.

Every config value and the cell key is validated against a strict pattern and quoted before it
reaches the script or a command line. ``setup_lines`` are the exception by design: they are the
user's own shell (module loads, venv activation, container exec) and are written verbatim.
"""

from __future__ import annotations

import re
import shlex
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deconflow.protocol import TRAIN_LOG

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MEM_RE = re.compile(r"^[0-9]+[KMGT]?$")
_TIME_RE = re.compile(r"^(?:(?P<days>[0-9]+)-)?(?P<rest>[0-9]+(?::[0-9]+){0,2})$")
# Paths end up in #SBATCH lines (which SLURM parses, expanding %j and friends) and in the
# script: allow only characters that need no quoting anywhere.
_PATH_RE = re.compile(r"^[A-Za-z0-9_./@+,=:~-]+$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_ID_RE = re.compile(r"^[0-9]+(?:_[0-9]+)?$")
USR1_EXIT = 128 + int(signal.SIGUSR1)


# sbatch options the generated script sets itself, and why a user's extra line may not.
_OWNED_OPTIONS = {
    "output": "the job's log is the work folder's train.log: Pipes and re-attach read it",
    "error": "the job's log is the work folder's train.log: Pipes and re-attach read it",
    "input": "the training reads no stdin",
    "open-mode": "the log is appended to across attempts",
    "chdir": "the job runs in the orchestrator's working directory",
    "workdir": "the job runs in the orchestrator's working directory",
    "job-name": "the job name <prefix>-<cell> is how an attempt finds its live job",
    "array": "one job per partition",
    "wrap": "the script is generated",
    "signal": "set signal_before_s instead",
    "export": "the script exports what the training needs",
}
_SHORT_OPTIONS = {
    "o": "output",
    "e": "error",
    "i": "input",
    "D": "chdir",
    "J": "job-name",
    "a": "array",
}


def _owned_option(opt: str) -> str | None:
    """The owned long option an extra sbatch line sets, if any.

    sbatch parses options with getopt_long, which takes any unambiguous prefix of a long
    option (``--out=...`` is ``--output``), and short options with the value attached
    (``-o/x.log``) or apart (``-o /x.log``).
    """
    if opt.startswith("--"):
        name = re.split(r"[=\s]", opt[2:], maxsplit=1)[0]
        if not name:
            return None
        for owned in _OWNED_OPTIONS:
            if owned.startswith(name):
                return owned
        return None
    return _SHORT_OPTIONS.get(opt[1:2])


class SlurmConfigError(ValueError):
    """A config value or key that must not reach sbatch; the message is one line."""


def check_name(field_name: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise SlurmConfigError(
            f"invalid SlurmResource.{field_name} {value!r}: must match {_NAME_RE.pattern}"
        )
    return value


def check_path(what: str, path: Path | str) -> str:
    s = str(path)
    if not _PATH_RE.match(s):
        raise SlurmConfigError(
            f"{what} {s!r} has characters SLURM options cannot carry safely "
            f"(allowed: {_PATH_RE.pattern})"
        )
    return s


def parse_time_limit(value: str) -> int:
    """Seconds of a SLURM ``--time`` value (``M``, ``M:S``, ``H:M:S``, ``D-H[:M[:S]]``)."""
    m = _TIME_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise SlurmConfigError(
            f"invalid SlurmResource.time_limit {value!r}: expected minutes, MM:SS, HH:MM:SS "
            "or D-HH[:MM[:SS]]"
        )
    parts = [int(p) for p in m["rest"].split(":")]
    if m["days"] is None:
        units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
        seconds = sum(p * u for p, u in zip(parts, units, strict=True))
    else:
        units = (3600, 60, 1)[: len(parts)]
        seconds = int(m["days"]) * 86400 + sum(p * u for p, u in zip(parts, units, strict=True))
    if seconds <= 0:
        raise SlurmConfigError(f"invalid SlurmResource.time_limit {value!r}: must be > 0")
    return seconds


@dataclass
class JobOptions:
    """The sbatch options of one training job (the SLURM resource's fields, as plain data)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_job: int = 1
    # >1 packs runs on a GPU through GPU sharing: --gres=<gpu_sharing>:<units per run>.
    workers_per_gpu: int = 1
    gpu_sharing: str = "shard"  # shard | mps
    # Sharing units one GPU has in the cluster's gres.conf (our local cluster: 2 shards per GPU;
    # MPS clusters usually give each GPU 100).
    shares_per_gpu: int = 2
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "4G"
    time_limit: str | None = None  # e.g. "01:00:00"
    # USR1 this long before the time limit so the run exits with its checkpoint; 0: none.
    signal_before_s: int = 120
    extra_sbatch_lines: list[str] = field(default_factory=list)  # e.g. ["--constraint=rtx8000"]
    # Verbatim shell before the training command (module load, venv, container exec): the
    # user's own code by design, NOT validated.
    setup_lines: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Reject any config value that could break out of the script or a command line."""
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None:
                check_name(name, value)
        if self.gpus_per_job < 0:
            raise SlurmConfigError(f"SlurmResource.gpus_per_job must be >= 0: {self.gpus_per_job}")
        if self.workers_per_gpu < 1:
            raise SlurmConfigError(
                f"SlurmResource.workers_per_gpu must be >= 1: {self.workers_per_gpu}"
            )
        if self.gpu_sharing not in ("shard", "mps"):
            raise SlurmConfigError(
                f"invalid SlurmResource.gpu_sharing {self.gpu_sharing!r}: expected shard or mps"
            )
        if self.workers_per_gpu > 1:
            self.gres()  # checks the division
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SlurmConfigError(
                f"SlurmResource.cpus_per_task must be >= 1: {self.cpus_per_task}"
            )
        if self.mem is not None and not _MEM_RE.match(str(self.mem)):
            raise SlurmConfigError(
                f"invalid SlurmResource.mem {self.mem!r}: expected like 4G, 4096M or 4096"
            )
        if self.time_limit is not None:
            parse_time_limit(self.time_limit)
        if not 0 <= self.signal_before_s <= 65535:
            raise SlurmConfigError(
                f"SlurmResource.signal_before_s must be in [0, 65535]: {self.signal_before_s}"
            )
        for line in self.extra_sbatch_lines:
            self.sbatch_option(line)
        for line in self.setup_lines:
            if "\0" in line:
                raise SlurmConfigError("SlurmResource.setup_lines may not contain NUL bytes")

    @staticmethod
    def sbatch_option(line: str) -> str:
        """An extra ``#SBATCH`` line: one option, one line (SLURM parses it, not the shell).

        Options that the script owns are refused: they would move the job's log or working
        folder, rename the job or turn it into an array, and the orchestrator could then no
        longer read the log or find the job again to re-attach to it.
        """
        opt = line.strip()
        opt = opt[len("#SBATCH") :].strip() if opt.startswith("#SBATCH") else opt
        if not opt.startswith("-") or any(c in opt for c in "\n\r\0"):
            raise SlurmConfigError(
                f"invalid SlurmResource.extra_sbatch_lines entry {line!r}: "
                "expected one option like '--constraint=rtx8000'"
            )
        owned = _owned_option(opt)
        if owned:
            raise SlurmConfigError(
                f"SlurmResource.extra_sbatch_lines entry {line!r} sets --{owned}, which deconflow "
                f"owns ({_OWNED_OPTIONS[owned]}); remove it"
            )
        return opt

    def gres(self) -> str | None:
        """The ``--gres`` value: whole GPUs, or sharing units when runs share a GPU."""
        if self.gpus_per_job == 0:
            return None
        if self.workers_per_gpu == 1:
            return f"gpu:{self.gpus_per_job}"
        units, rest = divmod(self.gpus_per_job * self.shares_per_gpu, self.workers_per_gpu)
        if units < 1 or rest:
            raise SlurmConfigError(
                f"cannot split {self.gpus_per_job} GPU(s) of {self.shares_per_gpu} "
                f"{self.gpu_sharing} units between {self.workers_per_gpu} workers evenly"
            )
        return f"{self.gpu_sharing}:{units}"


def render_script(
    options: JobOptions,
    job_name: str,
    cell_key: str,
    cmd: Sequence[str],
    env: dict[str, str],
    work: Path,
) -> str:
    """The batch script: validated #SBATCH options, quoted exports, setup lines, exec."""
    options.check()
    work = Path(work).resolve()
    log = check_path("work folder", work / TRAIN_LOG)
    cwd = check_path("working directory", Path.cwd())
    opts = [f"--job-name={job_name}", "--nodes=1", "--ntasks=1"]
    for flag, value in (
        ("partition", options.partition),
        ("account", options.account),
        ("qos", options.qos),
        ("gres", options.gres()),
        ("cpus-per-task", options.cpus_per_task),
        ("mem", options.mem),
        ("time", options.time_limit),
    ):
        if value:
            opts.append(f"--{flag}={value}")
    if options.signal_before_s:
        # B: signals the batch shell, which `exec` turned into the training process.
        opts.append(f"--signal=B:USR1@{options.signal_before_s}")
    opts += [
        f"--output={log}",
        f"--error={log}",
        "--open-mode=append",
        f"--chdir={cwd}",
        "--export=ALL",
    ]
    opts += [options.sbatch_option(line) for line in options.extra_sbatch_lines]
    lines = [
        "#!/bin/bash",
        f"# Generated by deconflow's SlurmResource for {cell_key}; rewritten on submit.",
        *(f"#SBATCH {shlex.quote(o)}" for o in opts),
        "set -e",
        'echo "[deconflow] SLURM job ${SLURM_JOB_ID} on $(hostname) at $(date -Is)"',
    ]
    for key, value in sorted(env.items()):
        if not _ENV_KEY_RE.match(key):
            raise SlurmConfigError(f"invalid environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(str(value))}")
    if options.setup_lines:
        lines.append("# setup_lines from the resource config (verbatim, user shell)")
        lines += list(options.setup_lines)
    lines.append("exec " + shlex.join(str(c) for c in cmd))
    return "\n".join(lines) + "\n"
