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
  rebuilt from the run's ``summary.json``.
- **No shell injection.** Every config value and the cell key is validated against a strict
  pattern and quoted before it reaches the script or a command line; commands run without a
  shell. ``setup_lines`` are the exception by design: they are the user's own shell (module
  loads, venv activation, container exec) and are written verbatim.
- **Checkpoint before the kill.** ``--signal=B:USR1@<signal_before_s>`` lets the training exit
  cleanly with its checkpoint intact; the next attempt resumes from ``checkpoints/latest.pt``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from deconflow.failures import TIMEOUT, UNKNOWN, classify_slurm_state
from deconflow.resources.compute import LOG_NAME, ComputeResource, Outcome, log_tail
from deconflow.sweep import Cell

JOB_ID_TAG = "deconflow/slurm_job_id"
STATE_TAG = "deconflow/slurm_state"
SLURM_SUBDIR = "slurm"  # under the run's work folder: job.sh, job_id, job.json
SCRIPT_NAME = "job.sh"
JOB_ID_FILE = "job_id"
JOB_INFO_FILE = "job.json"

# States after which a job never runs again (sacct/scontrol spelling).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)
# A job squeue lists in any of these may still run: adopt it rather than submit another.
LIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MEM_RE = re.compile(r"^[0-9]+[KMGT]?$")
_TIME_RE = re.compile(r"^(?:(?P<days>[0-9]+)-)?(?P<rest>[0-9]+(?::[0-9]+){0,2})$")
# Paths end up in #SBATCH lines (which SLURM parses, expanding %j and friends) and in the
# script: allow only characters that need no quoting anywhere.
_PATH_RE = re.compile(r"^[A-Za-z0-9_./@+,=:~-]+$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_ID_RE = re.compile(r"^[0-9]+(?:_[0-9]+)?$")
_USR1_EXIT = 128 + int(signal.SIGUSR1)


class SlurmConfigError(ValueError):
    """A config value or key that must not reach sbatch; the message is one line."""


class SlurmError(RuntimeError):
    """A SLURM client command failed; the message is one line with its stderr."""


# --------------------------------------------------------------------------- validation


def _check_name(field_name: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise SlurmConfigError(
            f"invalid SlurmResource.{field_name} {value!r}: must match {_NAME_RE.pattern}"
        )
    return value


def _check_path(what: str, path: Path | str) -> str:
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


def _one_line(text: str, limit: int = 400) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())[:limit]


# --------------------------------------------------------------------------- client commands


def _run_client(
    argv: Sequence[str], env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client (no shell); raise SlurmError with its stderr on failure."""
    try:
        proc = subprocess.run(
            list(argv), env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise SlurmError(
            f"{argv[0]} not found: is SLURM's client installed on this host?"
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]} did not answer within {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise SlurmError(
            f"{' '.join(argv[:2])} ... failed ({proc.returncode}): "
            f"{_one_line(proc.stderr or proc.stdout)}"
        )
    return proc


def _parse_scontrol(text: str) -> dict[str, dict[str, str]]:
    """``scontrol -o show job`` lines -> {job id: {field: value}} for the fields we use."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            out[fields["JobId"]] = fields
    return out


def _squeue_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of this host (flock on a side file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the poller


@dataclass
class JobState:
    """What the poller last learned about one job."""

    job_id: str
    state: str  # e.g. PENDING, RUNNING, COMPLETED, "CANCELLED by 0"
    reason: str = ""
    exit_code: str = ""  # "<exit status>:<signal>" as sacct prints it
    final: bool = False
    source: str = ""  # squeue | sacct | scontrol | poller

    @property
    def base_state(self) -> str:
        return self.state.split()[0].rstrip("+") if self.state else ""


class SlurmPoller:
    """One thread per process that asks SLURM about every job in flight, once per interval.

    ``squeue`` answers for running and pending jobs; jobs that left the queue are looked up
    in one ``sacct`` call (one ``scontrol -o show job`` if accounting fails or lags). When
    ``cache_path`` is set, the ``squeue`` listing (all of this user's jobs) is shared with the
    other processes of this host through that file, so N waiting processes still cost about
    one ``squeue`` per interval. ``counts`` records the commands actually run.
    """

    def __init__(
        self,
        env: dict[str, str],
        interval_s: float = 5.0,
        cache_path: Path | None = None,
        vanish_after_s: float = 300.0,
    ) -> None:
        self.env = env
        self.interval_s = interval_s
        self.cache_path = cache_path
        self.vanish_after_s = vanish_after_s
        self.counts: Counter[str] = Counter()
        self.last_error: str | None = None
        self._cond = threading.Condition()
        self._tracked: dict[str, float] = {}  # job id -> wall time it was tracked
        self._states: dict[str, JobState] = {}
        self._gone_since: dict[str, float] = {}
        self._wake = threading.Event()
        self._fresh = False  # next listing must not come from the shared cache
        self._thread: threading.Thread | None = None
        self._user = _squeue_user()

    # ---- waiter side
    def track(self, job_id: str, interval_s: float | None = None) -> None:
        """Start watching a job (its state shows up after the next poll)."""
        with self._cond:
            if interval_s:
                self.interval_s = min(self.interval_s, interval_s)
            if job_id in self._tracked:
                return
            self._tracked[job_id] = time.time()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="deconflow-slurm-poller", daemon=True
                )
                self._thread.start()
        self._wake.set()  # a new job: poll soon rather than after a whole interval

    def untrack(self, job_id: str) -> None:
        with self._cond:
            self._tracked.pop(job_id, None)
            self._gone_since.pop(job_id, None)
            self._states.pop(job_id, None)

    def poke(self) -> None:
        """Poll now with a fresh listing: a waiter saw its training process finish."""
        self._fresh = True
        self._wake.set()

    def state(self, job_id: str) -> JobState | None:
        with self._cond:
            return self._states.get(job_id)

    def wait_change(
        self, job_id: str, last: JobState | None, timeout: float = 1.0
    ) -> JobState | None:
        """Block up to ``timeout`` for a state other than ``last`` (short: stays interruptible)."""
        with self._cond:
            self._cond.wait_for(lambda: self._states.get(job_id) != last, timeout=timeout)
            return self._states.get(job_id)

    def wait_final(self, job_id: str, timeout: float) -> JobState | None:
        """Wait for the job's end state (used by cancel and tests)."""
        deadline = time.monotonic() + timeout
        st = self.state(job_id)
        while not (st and st.final) and time.monotonic() < deadline:
            st = self.wait_change(job_id, st, min(1.0, max(0.0, deadline - time.monotonic())))
        return st

    # ---- poller side
    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._tracked:
                    self._thread = None
                    return
            try:
                self.poll_once()
                self.last_error = None
            except Exception as exc:  # keep polling: a busy controller is not a job failure
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.counts["errors"] += 1
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def poll_once(self) -> None:
        """One round: a single squeue for everything in flight, then sacct for the leavers."""
        with self._cond:
            tracked = dict(self._tracked)
        if not tracked:
            return
        taken_at, listing = self._squeue_snapshot(list(tracked))
        updates: dict[str, JobState] = {}
        gone: list[str] = []
        for job_id, since in tracked.items():
            row = listing.get(job_id)
            if row is not None and row[0].split()[0] not in FINAL_STATES:
                updates[job_id] = JobState(job_id, row[0], row[1], source="squeue")
            elif row is not None or taken_at >= since:
                gone.append(job_id)  # left the queue (a listing older than the job proves nothing)
        if gone:
            updates.update(self._resolve_ended(gone))
        now = time.time()
        with self._cond:
            for job_id in gone:
                if job_id not in updates or not updates[job_id].final:
                    first = self._gone_since.setdefault(job_id, now)
                    if now - first > self.vanish_after_s:
                        updates[job_id] = JobState(
                            job_id,
                            "UNKNOWN",
                            "job left the queue and neither sacct nor scontrol knows it",
                            final=True,
                            source="poller",
                        )
            for job_id, st in updates.items():
                if job_id in self._tracked:
                    self._states[job_id] = st
            self._cond.notify_all()

    def _squeue_snapshot(self, ids: list[str]) -> tuple[float, dict[str, tuple[str, str]]]:
        """(time the listing started, {job id: (state, reason)}), from the cache when fresh."""
        fresh, self._fresh = self._fresh, False
        if self.cache_path is None:
            taken_at = time.time()
            return taken_at, self._squeue(["--jobs=" + ",".join(ids)])
        with _flock(self.cache_path.with_name(self.cache_path.name + ".lock")):
            try:
                cached = json.loads(self.cache_path.read_text())
                if not fresh and time.time() - cached["taken_at"] < 0.9 * self.interval_s:
                    self.counts["squeue_cached"] += 1
                    return cached["taken_at"], {k: tuple(v) for k, v in cached["jobs"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                pass
            taken_at = time.time()
            jobs = self._squeue([f"--user={self._user}"])
            _atomic_write(
                self.cache_path, json.dumps({"taken_at": taken_at, "jobs": jobs}), mode=0o600
            )
            return taken_at, jobs

    def _squeue(self, scope: list[str]) -> dict[str, tuple[str, str]]:
        self.counts["squeue"] += 1
        out = _run_client(
            ["squeue", "--noheader", "--format=%i|%T|%r", *scope], self.env, timeout=60
        ).stdout
        jobs: dict[str, tuple[str, str]] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2:
                jobs[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
        return jobs

    def _resolve_ended(self, ids: list[str]) -> dict[str, JobState]:
        """End states of jobs that left the queue: one sacct, then one scontrol if needed."""
        found: dict[str, JobState] = {}
        try:
            self.counts["sacct"] += 1
            out = _run_client(
                [
                    "sacct",
                    "-n",
                    "-P",
                    "-X",
                    "-o",
                    "JobID,State,ExitCode,Reason",
                    "-j",
                    ",".join(ids),
                ],
                self.env,
                timeout=60,
            ).stdout
            for line in out.splitlines():
                parts = line.strip().split("|")
                if len(parts) >= 3 and parts[0] in ids:
                    st = JobState(parts[0], parts[1], parts[3] if len(parts) > 3 else "", parts[2])
                    st.final, st.source = st.base_state in FINAL_STATES, "sacct"
                    if st.final:
                        found[parts[0]] = st
        except SlurmError:
            pass  # no accounting here: scontrol still knows the job for MinJobAge
        missing = [i for i in ids if i not in found]
        if missing:
            self.counts["scontrol"] += 1
            try:
                out = _run_client(["scontrol", "-o", "show", "job"], self.env, timeout=60).stdout
            except SlurmError:
                return found
            jobs = _parse_scontrol(out)
            for job_id in missing:
                f = jobs.get(job_id)
                if f and f.get("JobState", "") in FINAL_STATES:
                    found[job_id] = JobState(
                        job_id,
                        f["JobState"],
                        f.get("Reason", ""),
                        f.get("ExitCode", ""),
                        final=True,
                        source="scontrol",
                    )
        return found


_POLLERS: dict[tuple[str, str], SlurmPoller] = {}
_POLLERS_LOCK = threading.Lock()


def get_poller(env: dict[str, str], interval_s: float, cache_path: Path | None) -> SlurmPoller:
    """The process-wide poller for one cluster (keyed by SLURM_CONF and cache file)."""
    key = (env.get("SLURM_CONF", ""), str(cache_path or ""))
    with _POLLERS_LOCK:
        poller = _POLLERS.get(key)
        if poller is None:
            poller = _POLLERS[key] = SlurmPoller(env, interval_s, cache_path)
        poller.interval_s = min(poller.interval_s, interval_s)
        return poller


# --------------------------------------------------------------------------- the resource


@dataclass
class SlurmJob:
    """The handle ``launch`` returns: which job, and whether it was adopted."""

    job_id: str
    name: str
    adopted: bool = False
    submitted_at: float = field(default_factory=time.time)


class SlurmResource(ComputeResource):
    """Runs each training cell as one SLURM batch job (see the module docstring)."""

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
    extra_sbatch_lines: list[str] = []  # e.g. ["--constraint=rtx8000"]
    # Verbatim shell before the training command (module load, venv, container exec): the
    # user's own code by design, NOT validated.
    setup_lines: list[str] = []
    poll_interval_s: float = 5.0
    slurm_conf: str | None = None  # SLURM_CONF for the client commands; default: environment
    job_name_prefix: str = "dcf"
    cancel_wait_s: float = 15.0
    # Folder of the squeue cache shared by this host's processes; None: the temp dir,
    # "" turns sharing off (one squeue per process and interval).
    poll_cache_dir: str | None = None

    # ---- pure helpers (testable without a cluster)
    def check_config(self) -> None:
        """Reject any config value that could break out of the script or a command line."""
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None:
                _check_name(name, value)
        _check_name("job_name_prefix", self.job_name_prefix)
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
            self._sbatch_option(line)
        for line in self.setup_lines:
            if "\0" in line:
                raise SlurmConfigError("SlurmResource.setup_lines may not contain NUL bytes")
        if self.poll_interval_s <= 0:
            raise SlurmConfigError(
                f"SlurmResource.poll_interval_s must be > 0: {self.poll_interval_s}"
            )
        if self.slurm_conf is not None and "\0" in self.slurm_conf:
            raise SlurmConfigError("SlurmResource.slurm_conf may not contain NUL bytes")

    @staticmethod
    def _sbatch_option(line: str) -> str:
        """An extra ``#SBATCH`` line: one option, one line (SLURM parses it, not the shell)."""
        opt = line.strip()
        opt = opt[len("#SBATCH") :].strip() if opt.startswith("#SBATCH") else opt
        if not opt.startswith("-") or any(c in opt for c in "\n\r\0"):
            raise SlurmConfigError(
                f"invalid SlurmResource.extra_sbatch_lines entry {line!r}: "
                "expected one option like '--constraint=rtx8000'"
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

    def job_name(self, cell: Cell) -> str:
        """``<prefix>-<cell key>``: unique per partition, so re-attachment can find it."""
        return (
            _check_name("job_name_prefix", self.job_name_prefix)
            + "-"
            + _check_name("cell key", cell.key)
        )

    def client_env(self) -> dict[str, str]:
        """The environment of sbatch/squeue/sacct/scancel (SLURM_CONF from config if set)."""
        env = dict(os.environ)
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        return env

    def render_script(self, cell: Cell, cmd: Sequence[str], env: dict[str, str], work: Path) -> str:
        """The batch script: validated #SBATCH options, quoted exports, setup lines, exec."""
        self.check_config()
        work = Path(work).resolve()
        log = _check_path("work folder", work / LOG_NAME)
        cwd = _check_path("working directory", Path.cwd())
        opts = [f"--job-name={self.job_name(cell)}", "--nodes=1", "--ntasks=1"]
        for flag, value in (
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("gres", self.gres()),
            ("cpus-per-task", self.cpus_per_task),
            ("mem", self.mem),
            ("time", self.time_limit),
        ):
            if value:
                opts.append(f"--{flag}={value}")
        if self.signal_before_s:
            # B: signals the batch shell, which `exec` turned into the training process.
            opts.append(f"--signal=B:USR1@{self.signal_before_s}")
        opts += [
            f"--output={log}",
            f"--error={log}",
            "--open-mode=append",
            f"--chdir={cwd}",
            "--export=ALL",
        ]
        opts += [self._sbatch_option(line) for line in self.extra_sbatch_lines]
        lines = [
            "#!/bin/bash",
            f"# Generated by deconflow's SlurmResource for {cell.key}; rewritten on submit.",
            *(f"#SBATCH {shlex.quote(o)}" for o in opts),
            "set -e",
            'echo "[deconflow] SLURM job ${SLURM_JOB_ID} on $(hostname) at $(date -Is)"',
        ]
        for key, value in sorted(env.items()):
            if not _ENV_KEY_RE.match(key):
                raise SlurmConfigError(f"invalid environment variable name {key!r}")
            lines.append(f"export {key}={shlex.quote(str(value))}")
        if self.setup_lines:
            lines.append("# setup_lines from the resource config (verbatim, user shell)")
            lines += list(self.setup_lines)
        lines.append("exec " + shlex.join(str(c) for c in cmd))
        return "\n".join(lines) + "\n"

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
        out = _run_client(
            ["squeue", "--noheader", f"--name={name}", "--format=%i|%T|%j"], env
        ).stdout
        recorded = _read_text(Path(work) / SLURM_SUBDIR / JOB_ID_FILE)
        log = str(Path(work).resolve() / LOG_NAME)
        found = []
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 3 or parts[2] != name or parts[1] not in LIVE_STATES:
                continue
            if parts[0] != recorded:
                info = _parse_scontrol(
                    _run_client(["scontrol", "-o", "show", "job", parts[0]], env).stdout
                ).get(parts[0], {})
                if info.get("StdOut") != log:
                    continue
            found.append((parts[0], parts[1]))
        # The recorded job first, then the oldest.
        found.sort(key=lambda js: (js[0] != recorded, int(js[0].split("_")[0])))
        return found

    def has_live_attempt(self, cell: Cell, work: Path) -> bool:
        """Whether this partition's job still runs, so its work folder must be kept.

        For the asset to ask before it clears the work folder of a fresh attempt: an
        orchestrator that died mid-job leaves a job that the next materialization re-attaches to.
        """
        return bool(self.find_live_job(self.job_name(cell), Path(work)))

    def submit(self, script: Path) -> str:
        """``sbatch --parsable``; returns the job id."""
        out = _run_client(["sbatch", "--parsable", str(script)], self.client_env()).stdout
        job_id = out.strip().split(";")[0]
        if not _JOB_ID_RE.match(job_id):
            raise SlurmError(f"sbatch returned no job id: {_one_line(out)}")
        return job_id

    def launch(self, context, cell, cmd, env, work) -> SlurmJob:
        """Adopt this partition's live job if there is one, else submit a new one."""
        work = Path(work).resolve()
        script_text = self.render_script(cell, cmd, env, work)
        name = self.job_name(cell)
        sdir = work / SLURM_SUBDIR
        sdir.mkdir(parents=True, exist_ok=True)
        with _flock(sdir / ".submit.lock"):
            live = self.find_live_job(name, work)
            for extra_id, _ in live[1:]:  # never more than one live job per partition
                context.log.warning(f"cancelling duplicate SLURM job {extra_id} of {name}")
                subprocess.run(["scancel", extra_id], env=self.client_env(), check=False)
            if live:
                job = SlurmJob(live[0][0], name, adopted=True)
                state = live[0][1]
                context.log.warning(
                    f"re-attached to SLURM job {job.job_id} ({state}) of {cell.key} "
                    "instead of submitting a new one"
                )
            else:
                _atomic_write(sdir / SCRIPT_NAME, script_text, mode=0o700)
                job = SlurmJob(self.submit(sdir / SCRIPT_NAME), name)
                state = "PENDING"
                context.log.info(
                    f"submitted {cell.key} as SLURM job {job.job_id} "
                    f"(partition {self.partition or 'default'}, gres {self.gres() or 'none'})"
                )
            _atomic_write(sdir / JOB_ID_FILE, job.job_id + "\n")
        self._record(work, job, state)
        _add_tags(context, {JOB_ID_TAG: job.job_id, STATE_TAG: state})
        self._poller().track(job.job_id, self.poll_interval_s)
        return job

    def wait(self, context, cell, handle: SlurmJob, work) -> Outcome:
        """Block on the shared poller's table until the job ends; map its end state."""
        poller = self._poller()
        poller.track(handle.job_id, self.poll_interval_s)
        last: JobState | None = None
        last_error: str | None = None
        try:
            while True:
                st = poller.wait_change(handle.job_id, last, timeout=1.0)
                if st is not None and not st.final and _training_finished(Path(work), handle):
                    poller.poke()  # the job ends within a second: don't wait out the interval
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
                        _add_tags(context, {STATE_TAG: st.base_state})
                    self._record(work, handle, st.base_state, st)
                last = st
                if st.final:
                    break
        finally:
            poller.untrack(handle.job_id)
        return self._outcome(context, handle, last, Path(work))

    def _outcome(self, context, job: SlurmJob, st: JobState, work: Path) -> Outcome:
        tags = {JOB_ID_TAG: job.job_id, STATE_TAG: st.base_state}
        cls = classify_slurm_state(st.state, log_tail(work / LOG_NAME))
        if cls is None:
            context.log.info(f"SLURM job {job.job_id} ended {st.base_state}")
            return Outcome(ok=True, tags=tags)
        if st.base_state == "TIMEOUT":
            detail = f"time limit {self.time_limit or 'of the partition'}"
        elif st.base_state == "FAILED" and self.signal_before_s and _exited_on_usr1(st):
            cls = TIMEOUT
            detail = (
                f"exit {_USR1_EXIT}: stopped by SIGUSR1 {self.signal_before_s}s before the time "
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
        proc = subprocess.run(
            ["scancel", handle.job_id], env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            context.log.warning(
                f"scancel {handle.job_id} failed: {_one_line(proc.stderr or proc.stdout)}"
            )
        deadline = time.monotonic() + self.cancel_wait_s
        while time.monotonic() < deadline:
            q = subprocess.run(
                ["squeue", "--noheader", "--format=%T", f"--jobs={handle.job_id}"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.5)
        context.log.warning(f"cancelled SLURM job {handle.job_id}")
        try:
            _add_tags(context, {STATE_TAG: "CANCELLED"})
        except Exception:  # the run may already be gone from the instance's point of view
            pass

    # ---- results
    def train_cell(self, context, cell, profile, overrides, work) -> list:
        """The shared Pipes flow, plus SLURM metadata and the summary.json fallback."""
        results = super().train_cell(context, cell, profile, overrides, work)
        info = _read_json(Path(work) / SLURM_SUBDIR / JOB_INFO_FILE)
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
            summary_path = work / "summary.json"
            id_path = work / SLURM_SUBDIR / JOB_ID_FILE
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

    def _record(self, work: Path, job: SlurmJob, state: str, st: JobState | None = None) -> None:
        """``work/slurm/job.json``: the job as the run last saw it (read by train_cell)."""
        info = {"job_id": job.job_id, "name": job.name, "adopted": job.adopted, "state": state}
        if st is not None:
            info["last"] = asdict(st)
        _atomic_write(Path(work) / SLURM_SUBDIR / JOB_INFO_FILE, json.dumps(info, indent=2))


def _training_finished(work: Path, job: SlurmJob) -> bool:
    """The training process closed its Pipes session (or wrote its summary) for this job."""
    try:
        with open(work / ".pipes" / "messages.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2048))
            lines = f.read().splitlines()
        if lines and b'"method": "closed"' in lines[-1]:
            return True
    except OSError:
        pass
    try:
        summary = (work / "summary.json").stat().st_mtime
        return summary >= (work / SLURM_SUBDIR / JOB_ID_FILE).stat().st_mtime
    except OSError:
        return False


def _exited_on_usr1(st: JobState) -> bool:
    """The training's USR1 handler exits 128+USR1 (138). scontrol shows ``138:0``; SLURM
    22.05's sacct shows such an exit as ``10:0``, and our training never exits 10 itself."""
    status = st.exit_code.split(":")[0]
    return status == str(_USR1_EXIT) or (st.source == "sacct" and status == str(_USR1_EXIT - 128))


def summary_metadata(summary: dict, work: Path) -> dict:
    """The materialization metadata the training process would have sent (run.py's fields)."""
    import math

    from deconflow.training.run import METADATA_FIELDS

    meta = {}
    for k in METADATA_FIELDS:
        v = summary.get(k)
        if v is not None and not (isinstance(v, float) and not math.isfinite(v)):
            meta[k] = v
    meta["run_dir"] = str(work)
    return meta


def _add_tags(context, tags: dict[str, str]) -> None:
    context.instance.add_run_tags(context.run.run_id, tags)


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
