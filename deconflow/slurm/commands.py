"""SLURM client commands (no Dagster): run sbatch/squeue/sacct/scontrol/scancel safely.

Commands run without a shell; a failing command raises :class:`SlurmError` with one line.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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

_JOB_ID_RE = re.compile(r"^[0-9]+(?:_[0-9]+)?$")


class SlurmError(RuntimeError):
    """A SLURM client command failed; the message is one line with its stderr."""


def run_client(
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
            f"{one_line(proc.stderr or proc.stdout)}"
        )
    return proc


def parse_scontrol(text: str) -> dict[str, dict[str, str]]:
    """``scontrol -o show job`` lines -> {job id: {field: value}} for the fields we use."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            out[fields["JobId"]] = fields
    return out


def squeue_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


@contextmanager
def flock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of this host (flock on a side file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def one_line(text: str, limit: int = 400) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())[:limit]


def submit(script: Path, env: dict[str, str]) -> str:
    """``sbatch --parsable``; returns the job id."""
    out = run_client(["sbatch", "--parsable", str(script)], env).stdout
    job_id = out.strip().split(";")[0]
    if not _JOB_ID_RE.match(job_id):
        raise SlurmError(f"sbatch returned no job id: {one_line(out)}")
    return job_id


def scancel(job_id: str, env: dict[str, str]) -> str | None:
    """Cancel a job; returns an error line, or None when SLURM accepted the request."""
    proc = subprocess.run(
        ["scancel", job_id], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        return f"scancel {job_id} failed: {one_line(proc.stderr or proc.stdout)}"
    return None


def wait_gone(job_id: str, env: dict[str, str], timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) until squeue no longer lists the job."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        q = subprocess.run(
            ["squeue", "--noheader", "--format=%T", f"--jobs={job_id}"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if q.returncode != 0 or not q.stdout.strip():
            return
        time.sleep(0.5)


def live_jobs_named(name: str, env: dict[str, str]) -> list[tuple[str, str]]:
    """(job id, state) of the live jobs with exactly this name."""
    out = run_client(["squeue", "--noheader", f"--name={name}", "--format=%i|%T|%j"], env).stdout
    found = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[2] == name and parts[1] in LIVE_STATES:
            found.append((parts[0], parts[1]))
    return found


def jobs_named_since(name: str, since: float, env: dict[str, str]) -> list[tuple[str, str]]:
    """(job id, state) of every job with exactly this name submitted at or after ``since``
    (epoch seconds), oldest first, from SLURM's accounting (sacct)."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(since) - 1))
    out = run_client(
        ["sacct", "-n", "-P", "-X", f"--name={name}", f"--starttime={start}",
         "--format=JobID,State,JobName,Submit"], env,
    ).stdout  # fmt: skip
    found = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[2] == name:
            found.append((parts[0], parts[1].split()[0]))
    found.sort(key=lambda js: int(js[0].split("_")[0]))
    return found


def job_stdout(job_id: str, env: dict[str, str]) -> str | None:
    """The StdOut path SLURM records for a job (scontrol), or None."""
    info = parse_scontrol(run_client(["scontrol", "-o", "show", "job", job_id], env).stdout)
    return info.get(job_id, {}).get("StdOut")
