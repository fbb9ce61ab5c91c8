"""Orchestration overhead of SlurmResource per partition, on the local one-node cluster.

For each run it materializes one ``training_run`` partition (demo profile, tiny) in a child
process (the "Dagster run process": in-process executor, as ``dg.materialize`` runs it) and
measures from the outside:

- submit -> training start: ``work/slurm/job_id`` written (sbatch returned) to the first
  heartbeat of the training (written once data and model are ready); ``queue`` is the part
  SLURM accounts as waiting (sacct Start - Submit, 1 s resolution);
- training end -> materialization: ``summary.json`` written to the ASSET_MATERIALIZATION
  event in the run's event log (job end detection by the poller, Pipes, publishing);
- RSS of the run process while it waits on SLURM (``/proc/<pid>/status`` VmRSS, sampled
  every 50 ms between submission and the end of training).

A ``local`` row (LocalProcessResource, same partition) is the reference without SLURM.

    python bench/slurm_overhead.py [--runs 3] [--poll 1,5] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HPS = ["lr0.1_wd0.001_s0", "lr0.05_wd0.0001_s1", "lr0.2_wd0.01_s2", "lr0.1_wd0.01_s3"]


def child(args: dict) -> None:
    """Materialize one partition; print the event timestamps the parent needs as JSON."""
    os.environ["DECONFLOW_DATA"] = args["data"]
    import dagster as dg

    from deconflow.assets.training import build_training_run
    from deconflow.resources.compute import LocalProcessResource
    from deconflow.resources.slurm import SlurmResource
    from deconflow.resources.sweep_settings import SweepSettings
    from deconflow.sweep import load_grid

    if args["compute"] == "slurm":
        compute = SlurmResource(
            partition="gpu",
            time_limit="00:10:00",
            mem="1G",
            poll_interval_s=args["poll"],
            slurm_conf=args["slurm_conf"],
            job_name_prefix="bench",
        )
    else:
        compute = LocalProcessResource()
    instance = dg.DagsterInstance.ephemeral()
    res = dg.materialize(
        [build_training_run(load_grid())],
        partition_key=dg.MultiPartitionKey({"variant": "base", "hp": args["hp"]}),
        resources={
            "compute": compute,
            "sweep": SweepSettings(
                profile="demo", overrides_json=json.dumps({"epochs": args["epochs"]})
            ),
        },
        instance=instance,
        raise_on_error=False,
    )
    stamps = {}
    for rec in instance.all_logs(res.run_id):
        ev = rec.dagster_event
        if ev is not None and ev.event_type_value in ("ASSET_MATERIALIZATION", "STEP_START"):
            stamps[ev.event_type_value] = rec.timestamp
    print(json.dumps({"success": res.success, **stamps}))


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _sacct_times(job_id: str, env: dict) -> tuple[float, float] | None:
    """(Submit, Start) of a job as epoch seconds, from accounting."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "Submit,Start", "-j", job_id],
        env={**env, "SLURM_TIME_FORMAT": "%s"},
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    try:
        submit, start = out[0].split("|")
        return float(submit), float(start)
    except (IndexError, ValueError):
        return None


def measure(compute: str, hp: str, poll: float, epochs: int, root: Path, env: dict) -> dict:
    """One partition, end to end, watched from this process."""
    data = root / f"{compute}-{poll}-{hp}"
    work = data / "work" / f"base__{hp}"
    args = {
        "compute": compute,
        "hp": hp,
        "poll": poll,
        "epochs": epochs,
        "data": str(data),
        "slurm_conf": env.get("SLURM_CONF"),
    }
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(args)],
        cwd=REPO,
        env={**env, "DECONFLOW_DATA": str(data)},
        stdout=subprocess.PIPE,
        stderr=open(data.parent / f"{compute}-{poll}-{hp}.log", "w"),
        text=True,
    )
    submitted = train_start = train_end = None
    waiting_rss: list[int] = []
    while proc.poll() is None:
        jid = work / "slurm" / "job_id"
        if submitted is None and jid.exists():
            submitted = jid.stat().st_mtime
        if submitted is None and compute == "local" and (work / "train.log").exists():
            submitted = (work / "train.log").stat().st_mtime  # the subprocess was started
        if train_start is None:
            try:
                beat = json.loads((work / "heartbeat.json").read_text())
                if beat["step"] == 0:
                    train_start = beat["time"]
                else:  # missed the first beat (should not happen at 50 ms sampling)
                    train_start = float("nan")
            except (OSError, ValueError, KeyError):
                pass
        summary = work / "summary.json"
        if train_end is None and summary.exists():
            train_end = summary.stat().st_mtime
        if submitted is not None and train_end is None:
            rss = _rss_kb(proc.pid)
            if rss:
                waiting_rss.append(rss)
        time.sleep(0.05)
    out = json.loads(proc.stdout.read().strip().splitlines()[-1])
    row = {
        "compute": compute if compute == "local" else f"slurm (poll {poll:g}s)",
        "hp": hp,
        "ok": out["success"],
        "total_s": time.time() - t0,
        "submit_to_train_s": (train_start - submitted) if submitted and train_start else None,
        "queue_s": None,
        "train_s": (train_end - train_start) if train_start and train_end else None,
        "end_to_mat_s": (out["ASSET_MATERIALIZATION"] - train_end)
        if train_end and "ASSET_MATERIALIZATION" in out
        else None,
        "rss_mb": statistics.median(waiting_rss) / 1024 if waiting_rss else None,
        "rss_max_mb": max(waiting_rss) / 1024 if waiting_rss else None,
    }
    jid = work / "slurm" / "job_id"
    if compute == "slurm" and jid.exists():
        times = _sacct_times(jid.read_text().strip(), env)
        if times:
            row["queue_s"] = times[1] - times[0]
    return row


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=3, help="partitions per configuration")
    p.add_argument("--poll", default="1,5", help="poll intervals (s) to compare")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no-local", action="store_true", help="skip the local reference row")
    a = p.parse_args(argv)
    if a.child:
        child(json.loads(a.child))
        return 0

    from deconflow_dev import slurm_cluster as cluster

    info = cluster.up(cluster.default_state_dir())
    env = {**os.environ, "SLURM_CONF": str(info.slurm_conf)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dcf-bench-") as tmp:
        configs = [] if a.no_local else [("local", 0.0)]
        configs += [("slurm", float(x)) for x in a.poll.split(",")]
        for compute, poll in configs:
            for hp in HPS[: a.runs if compute == "slurm" else 1]:
                rows.append(measure(compute, hp, poll, a.epochs, Path(tmp), env))
                print(f"  done {rows[-1]['compute']} {hp}", file=sys.stderr, flush=True)
    print(
        f"\nSlurmResource overhead per partition - local one-node cluster, {os.cpu_count()} "
        f"cores, demo profile {a.epochs} epochs, {time.strftime('%Y-%m-%d')}\n"
    )
    head = (
        f"{'compute':<18} {'partition (hp)':<20} {'ok':<3} {'submit->train':>13} "
        f"{'(queue)':>8} {'train':>7} {'end->mat':>9} {'total':>7} "
        f"{'RSS waiting':>12} {'RSS max':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['compute']:<18} {r['hp']:<20} {'y' if r['ok'] else 'n':<3} "
            f"{_fmt(r['submit_to_train_s']):>12}s {_fmt(r['queue_s'], '.0f'):>7}s "
            f"{_fmt(r['train_s'], '.1f'):>6}s "
            f"{_fmt(r['end_to_mat_s']):>8}s {_fmt(r['total_s'], '.1f'):>6}s "
            f"{_fmt(r['rss_mb'], '.0f'):>9} MB {_fmt(r['rss_max_mb'], '.0f'):>5} MB"
        )
    print(
        "\nsubmit->train: sbatch returned (work/slurm/job_id) -> first training heartbeat;\n"
        "(queue): sacct Start - Submit, 1 s resolution; train: first heartbeat -> summary.json;\n"
        "end->mat: summary.json written -> ASSET_MATERIALIZATION recorded;\n"
        "RSS: VmRSS of the run process (in-process executor) while its job is in flight;\n"
        "total: the run process's start to exit (imports included)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
