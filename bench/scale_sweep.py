"""The users' real job at small scale: a whole-grid backfill through SLURM, with the
orchestrator stopped and started again midway.

Run as a user would: the local one-node SLURM cluster with GPU-like slots (gres/shard), a
PostgreSQL Dagster instance, ``dagster dev`` (webserver + daemon, the watchdog and the analysis
automation running), and a backfill of every ``training_run`` partition launched through the
webserver's GraphQL API, exactly as the UI's "Materialize all" backfill does. When about a
third of the cells have landed, the whole ``dagster dev`` is stopped (SIGINT to its process
group, what Ctrl-C does) and started again.

Reports (JSON + a Markdown table for BENCHMARKS.md): wall time; per-cell orchestration overhead
(submit -> training start, training end -> materialized); peak total orchestrator RSS and RSS
per run worker; the instance database's size and events per cell; and the proof: every cell
materialized, one set of rows per cell in every DuckDB table, no SLURM job CANCELLED, no orphan
processes after the final stop.

    python bench/scale_sweep.py [--slots 16] [--epochs 1] [--out /tmp/scale]

It stops and restarts the local SLURM cluster with the slots it needs, and brings it back to
its defaults at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deconflow.protocol import WORKER_TAG  # noqa: E402
from deconflow.warehouse.store import connect_readonly  # noqa: E402

LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_table() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgid) of every process, from /proc/<pid>/stat."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, ppid, pgid = stat[stat.rfind(")") + 2 :].split()[:3]
            out.append((int(entry.name), state, int(ppid), int(pgid)))
        except (OSError, ValueError):
            continue
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, _, ppid, _ in proc_table():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    return [pid for pid, state, _, group in proc_table() if group == pgid and state != "Z"]


def cmd_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Orchestrator:
    """``dagster dev`` in its own process group; sampled for RSS while it runs."""

    def __init__(self, env: dict, log: Path, port: int) -> None:
        self.env, self.log, self.port, self.proc = env, log, port, None
        self.samples: list[dict] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["dagster", "dev", "-m", "deconflow.definitions", "-p", str(self.port)],
            cwd=REPO,
            env=self.env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/server_info", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise SystemExit(f"dagster dev did not come up; see {self.log}")

    def sample(self, instance) -> None:
        """Total RSS of the ``dagster dev`` tree, and of each run worker in it (found by the
        worker identity the training asset tags its run with)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = tree_pids(self.proc.pid)
        live = instance.get_runs(dg_filter_live(), limit=1000)
        tagged = {int(r.tags[WORKER_TAG].split(":")[1]) for r in live if WORKER_TAG in r.tags}
        workers = [p for p in pids if p in tagged]
        self.samples.append(
            {
                "t": time.time(),
                "total_mb": sum(rss_mb(p) for p in pids),
                "workers": len(workers),
                "worker_mb": [rss_mb(p) for p in workers],
            }
        )

    def stop(self, grace_s: float = 120) -> dict:
        """What Ctrl-C on ``dagster dev`` does: SIGINT to the process group, then wait; after
        ``grace_s`` SIGKILL, what a user's ``kill -9`` or a crashed VM does. Returns how long it
        took and which processes were still there after 10 s."""
        if self.proc is None:
            return {}
        t0 = time.monotonic()
        pgid = self.proc.pid
        os.killpg(pgid, signal.SIGINT)
        after_10s: list[str] = []
        killed = False
        while self.proc.poll() is None or _group(pgid):
            waited = time.monotonic() - t0
            if not after_10s and waited > 10:
                after_10s = [cmd_of(p)[:100] for p in _group(pgid)] or ["-"]
            if waited > grace_s:
                os.killpg(pgid, signal.SIGKILL)
                killed = True
                self.proc.wait(10)
                break
            time.sleep(0.5)
        self.proc = None
        return {
            "stop_s": round(time.monotonic() - t0, 1),
            "sigkilled": killed,
            "alive_after_10s": [c for c in after_10s if c != "-"],
        }


def dg_filter_live():
    import dagster as dg

    return dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING])


def bench_processes(data: Path) -> list[int]:
    """Processes (other than this one) started for this benchmark: they carry its data folder
    in their environment. Run workers, code servers and training processes all inherit it."""
    marker = f"DECONFLOW_DATA={data}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env:
            out.append(int(entry.name))
    return out


def graphql(port: int, query: str, variables: dict) -> dict:
    r = requests.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": variables},
        timeout=60,
    )
    r.raise_for_status()
    return r.json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=16, help="GPU-like slots (gres/shard)")
    ap.add_argument("--epochs", type=int, default=1, help="demo-profile epochs per cell")
    ap.add_argument("--out", default="/tmp/deconflow-scale")
    ap.add_argument("--restart-at", type=float, default=0.33, help="fraction landed")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--grid", default=None, help="a grid TOML (default: the 216-cell grid)")
    ap.add_argument(
        "--settle", type=float, default=90, help="seconds for the analysis after the last cell"
    )
    ap.add_argument(
        "--keep-cluster", action="store_true", help="use the running cluster as it is (smoke run)"
    )
    args = ap.parse_args()

    from deconflow_dev import postgres
    from deconflow_dev import slurm_cluster as cluster

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data, home = out / "data", out / "dagster_home"

    # The cluster with the slots asked for (restarted: its config is rendered on `up`).
    state = cluster.default_state_dir()
    if not args.keep_cluster:
        cluster.down(state)
        os.environ.update(
            DECONFLOW_SLURM_GPUS=str(args.slots // 2),
            DECONFLOW_SLURM_SHARDS=str(args.slots),
            DECONFLOW_SLURM_CPUS=str(args.slots),
        )
    info = cluster.up(state)
    if args.grid:
        os.environ["DECONFLOW_GRID"] = str(Path(args.grid).resolve())
    pg = postgres.up(postgres.default_state_dir())
    url = postgres.reset_database(pg, "dcf_scale")

    slurm_toml = out / "slurm.toml"
    slurm_toml.write_text(
        "[slurm]\n"
        'partition = "gpu"\n'
        "gpus_per_job = 1\n"
        "workers_per_gpu = 2\n"  # 2 runs per GPU through shards, as the plan packs them
        'gpu_sharing = "shard"\n'
        'mem = "400M"\n'
        'time_limit = "00:20:00"\n'
        "poll_interval_s = 5.0\n"
        f'slurm_conf = "{info.slurm_conf}"\n'
        'job_name_prefix = "scale"\n'
    )
    env = {
        **os.environ,
        "DECONFLOW_DATA": str(data),
        "DAGSTER_HOME": str(home),
        "DECONFLOW_PG_URL": url,
        "DECONFLOW_COMPUTE": "slurm",
        "DECONFLOW_SLURM_CONFIG": str(slurm_toml),
        "DECONFLOW_PROFILE": "demo",
        "DECONFLOW_TRAIN_OVERRIDES": json.dumps(
            {"epochs": args.epochs, "hessian_every": 0, "heartbeat_every_s": 1.0}
        ),
        "DECONFLOW_TRAINING_SLOTS": str(args.slots),
        "DECONFLOW_WATCHDOG_INTERVAL_S": "10",
        "SLURM_CONF": str(info.slurm_conf),
        "DECONFLOW_TORCH_THREADS": "1",
    }
    # dagster.yaml (the slots among it) is rendered from this environment, as `deconflow dev`
    # renders it from the user's.
    os.environ.update(env)
    from deconflow.instance import ensure_dagster_home

    ensure_dagster_home()

    import dagster as dg

    from deconflow.instance import training_runs_limit

    limits = dg.DagsterInstance.get().get_concurrency_config().run_queue_config
    slot_limit = {t["key"]: t["limit"] for t in limits.tag_concurrency_limits}
    slots, depth = training_runs_limit()
    if slots != args.slots or slot_limit.get("dagster/partition/variant") != slots + depth:
        raise SystemExit(
            f"the instance's training runs limit is {slot_limit}, not {args.slots} slots + {depth}"
        )
    print(f"{slots} training slots + SLURM queue depth {depth}", flush=True)

    from deconflow.sweep import load_grid

    grid = load_grid()
    n_cells = len(grid.cells)
    port = free_port()
    orch = Orchestrator(env, out / "dagster_dev.log", port)
    t0 = time.time()
    orch.start()
    res = graphql(
        port,
        LAUNCH_BACKFILL,
        {"params": {"assetSelection": [{"path": ["training_run"]}], "allPartitions": True}},
    )
    print("backfill:", res["data"]["launchPartitionBackfill"], flush=True)

    instance = dg.DagsterInstance.get()
    key = dg.AssetKey("training_run")

    def landed() -> int:
        return len(instance.get_materialized_partitions(key))

    restarted_at = None
    restart_gap = None
    stop_info: dict = {}
    jobs_before_stop: list[str] = []
    while time.time() - t0 < args.timeout:
        orch.sample(instance)
        n = landed()
        if restarted_at is None and n >= args.restart_at * n_cells:
            jobs_before_stop = [
                ln
                for ln in subprocess.run(
                    ["squeue", "-h", "-o", "%i|%T|%j"], env=env, capture_output=True, text=True
                ).stdout.splitlines()
                if "|scale-" in ln
            ]
            print(f"[{time.time() - t0:.0f}s] {n} landed: stopping dagster dev", flush=True)
            t_stop = time.time()
            stop_info = orch.stop()
            print(f"stopped: {stop_info}", flush=True)
            time.sleep(5)
            orch.start()
            restart_gap = time.time() - t_stop
            restarted_at = time.time() - t0
            print(f"[{restarted_at:.0f}s] dagster dev is back ({restart_gap:.0f}s)", flush=True)
        if n >= n_cells:
            break
        print(f"[{time.time() - t0:.0f}s] {n}/{n_cells} landed", flush=True)
        time.sleep(5)
    wall = time.time() - t0
    # Let the analysis catch up with the last landing, then stop everything.
    time.sleep(args.settle)
    orch.sample(instance)
    orch.stop()
    time.sleep(3)

    report = collect(instance, env, data, url, grid, orch, t0, wall, restarted_at, restart_gap)
    report["slots"], report["queue_depth"] = slots, depth
    report["slots_from_sacct"] = slot_usage(report.pop("_sacct_jobs"), slots)
    report["jobs_live_at_stop"] = len(jobs_before_stop)
    report["restart_stop"] = stop_info
    (out / "scale_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))

    if args.keep_cluster:
        return 0 if report["proof"]["all_ok"] else 1
    # Back to the default cluster for the tests.
    cluster.down(state)
    for k in ("DECONFLOW_SLURM_GPUS", "DECONFLOW_SLURM_SHARDS", "DECONFLOW_SLURM_CPUS"):
        os.environ.pop(k, None)
    cluster.up(state)
    return 0 if report["proof"]["all_ok"] else 1


def collect(instance, env, data, url, grid, orch, t0, wall, restarted_at, restart_gap) -> dict:
    import dagster as dg
    import psycopg2

    from deconflow.protocol import FAMILIES, SUMMARY

    key = dg.AssetKey("training_run")
    runs = instance.get_runs(dg.RunsFilter(tags={}))
    training = [r for r in runs if r.tags.get("dagster/partition/variant")]
    by_status: dict[str, int] = {}
    for r in training:
        by_status[r.status.value] = by_status.get(r.status.value, 0) + 1

    # Per cell: submit -> training start, training end -> materialized.
    submit_to_start, end_to_mat = [], []
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0 - 5))
    sacct = subprocess.run(
        # Only this benchmark's jobs: submitted since it started.
        ["sacct", "-n", "-P", "-X", "-o", "JobID,JobName,State,Submit,Start,End", "-S", since],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    jobs = [ln.split("|") for ln in sacct if "|scale-" in ln]
    cancelled = [j for j in jobs if j[2].startswith("CANCELLED")]
    mat_time: dict[str, float] = {}
    for rec in instance.fetch_materializations(key, limit=10_000).records:
        part = rec.event_log_entry.dagster_event.partition
        mat_time[part] = max(mat_time.get(part, 0.0), rec.event_log_entry.timestamp)
    reattached = 0
    for cell in grid.cells:
        work = data / "work" / cell.key
        try:
            summary = json.loads((work / SUMMARY).read_text())
            end = (work / SUMMARY).stat().st_mtime
            submitted = (work / "slurm" / "job_id").stat().st_mtime
        except (OSError, ValueError):
            continue
        started = end - float(summary.get("wall_time_s") or 0.0)
        if summary.get("attempts", 1) == 1 and started >= submitted:
            submit_to_start.append(started - submitted)
        else:
            reattached += 1  # resumed or re-attached: its job_id file was rewritten later
        part = f"{cell.hp}|{cell.variant}"
        if part in mat_time:
            end_to_mat.append(mat_time[part] - end)

    # Instance database size and events per cell.
    con = psycopg2.connect(url)
    cur = con.cursor()
    cur.execute("SELECT pg_database_size(current_database())")
    db_bytes = cur.fetchone()[0]
    cur.execute("SELECT count(*) FROM event_logs")
    events = cur.fetchone()[0]
    con.close()

    # DuckDB: one set of rows per cell in every table.
    db = data / "deconflow.duckdb"
    dup = {}
    counts = {}
    if db.exists():
        c = connect_readonly(db)
        for fam in FAMILIES:
            counts[fam] = c.execute(f"SELECT count(DISTINCT run_id) FROM {fam}").fetchone()[0]
            dup[fam] = c.execute(
                f"SELECT count(*) FROM (SELECT run_id, step FROM {fam} "
                "GROUP BY ALL HAVING count(*) > 1)"
            ).fetchone()[0]
        for t in ("runs", "run_fits", "completeness"):
            counts[t] = c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            dup[t] = c.execute(
                f"SELECT count(*) FROM (SELECT run_id FROM {t} GROUP BY ALL HAVING count(*) > 1)"
            ).fetchone()[0]
        counts["runs_materialized"] = c.execute(
            "SELECT count(*) FROM runs WHERE status IN ('materialized', 'diverged')"
        ).fetchone()[0]
        c.close()

    leftover = [f"{p} {cmd_of(p)[:120]}" for p in bench_processes(data)]
    live_jobs = [
        ln
        for ln in subprocess.run(
            ["squeue", "-h", "-o", "%i|%j"], env=env, capture_output=True, text=True
        ).stdout.splitlines()
        if "|scale-" in ln
    ]
    materialized = len(instance.get_materialized_partitions(key))
    peak_total = max((s["total_mb"] for s in orch.samples), default=0.0)
    worker_rss = [mb for s in orch.samples for mb in s["worker_mb"] if mb > 0]
    peak_workers = max((s["workers"] for s in orch.samples), default=0)
    idle = [s["total_mb"] for s in orch.samples if s["workers"] == 0]
    proof = {
        "cells": len(grid.cells),
        "materialized_partitions": materialized,
        "duckdb_counts": counts,
        "duckdb_duplicate_keys": dup,
        "sacct_jobs": len(jobs),
        "sacct_cancelled": len(cancelled),
        "orphan_processes": leftover,
        "live_jobs_after": live_jobs,
    }
    proof["all_ok"] = (
        materialized == len(grid.cells)
        and not cancelled
        and not leftover
        and not live_jobs
        and all(v == 0 for v in dup.values())
        and counts.get("batch_metrics") == len(grid.cells)
    )
    return {
        "_sacct_jobs": jobs,
        "wall_s": wall,
        "restart_at_s": restarted_at,
        "restart_gap_s": restart_gap,
        "dagster_runs": len(training),
        "runs_by_status": by_status,
        "submit_to_training_start_s": _stats(submit_to_start),
        "cells_resumed_or_reattached": reattached,
        "training_end_to_published_s": _stats(end_to_mat),
        "peak_total_orchestrator_rss_mb": peak_total,
        "orchestrator_rss_without_runs_mb": statistics.median(idle) if idle else None,
        "peak_run_workers": peak_workers,
        "run_worker_rss_mb": _stats(worker_rss),
        "instance_db_mb": db_bytes / 2**20,
        "events": events,
        "events_per_cell": events / len(grid.cells),
        "proof": proof,
    }


def _ts(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def slot_usage(jobs: list[list[str]], slots: int) -> dict:
    """Slot gaps and busy share from sacct's start/end per job (whole seconds).

    Jobs are laid on ``slots`` lanes in start order, each on the lane that freed first (what
    the scheduler does with identical slots). A gap is one job's end to the next job's start
    on the same lane; every gap counts, since the grid has cells waiting until the last job
    starts. Busy: job time over ``slots`` x (first start -> last end)."""
    spans = sorted(
        (st, en)
        for st, en in ((_ts(j[4]), _ts(j[5])) for j in jobs if len(j) > 5)
        if st is not None and en is not None and en >= st
    )
    if not spans:
        return {}
    lanes = [spans[0][0]] * slots  # when each lane frees
    first = [True] * slots
    gaps = []
    for st, en in spans:
        i = min(range(slots), key=lambda k: lanes[k])
        if not first[i]:
            gaps.append(max(0.0, st - lanes[i]))
        first[i] = False
        lanes[i] = max(lanes[i], en)
    window = max(en for _, en in spans) - spans[0][0]
    busy = sum(en - st for st, en in spans) / (slots * window) if window > 0 else 0.0
    return {
        "jobs": len(spans),
        "gap_s": _stats(gaps),
        "gaps": gaps,
        "second_slot_first_start_s": spans[1][0] - spans[0][0] if len(spans) > 1 else None,
        "job_s_median": statistics.median(en - st for st, en in spans),
        "busy": busy,
    }


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "p90": xs[int(0.9 * (len(xs) - 1))],
        "max": xs[-1],
    }


if __name__ == "__main__":
    sys.exit(main())
