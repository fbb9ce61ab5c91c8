"""The batched SLURM poller: one thread per process asks about every job in flight at once."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from deconflow.atomic import atomic_write_text
from deconflow.slurm.commands import (
    FINAL_STATES,
    SlurmError,
    flock,
    parse_scontrol,
    run_client,
    squeue_user,
)


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
        self._user = squeue_user()

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
            updates.update(self.end_states(gone))
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
        with flock(self.cache_path.with_name(self.cache_path.name + ".lock")):
            try:
                cached = json.loads(self.cache_path.read_text())
                if not fresh and time.time() - cached["taken_at"] < 0.9 * self.interval_s:
                    self.counts["squeue_cached"] += 1
                    return cached["taken_at"], {k: tuple(v) for k, v in cached["jobs"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                pass
            taken_at = time.time()
            jobs = self._squeue([f"--user={self._user}"])
            atomic_write_text(
                self.cache_path, json.dumps({"taken_at": taken_at, "jobs": jobs}), mode=0o600
            )
            return taken_at, jobs

    def _squeue(self, scope: list[str]) -> dict[str, tuple[str, str]]:
        self.counts["squeue"] += 1
        out = run_client(
            ["squeue", "--noheader", "--format=%i|%T|%r", *scope], self.env, timeout=60
        ).stdout
        jobs: dict[str, tuple[str, str]] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2:
                jobs[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
        return jobs

    def end_states(self, ids: list[str]) -> dict[str, JobState]:
        """End states of jobs that left the queue: one sacct, then one scontrol if needed."""
        found: dict[str, JobState] = {}
        try:
            self.counts["sacct"] += 1
            out = run_client(
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
                out = run_client(["scontrol", "-o", "show", "job"], self.env, timeout=60).stdout
            except SlurmError:
                return found
            jobs = parse_scontrol(out)
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
