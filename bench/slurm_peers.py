"""One cell, the same training command three ways on the local SLURM cluster (issue 25, item 3).

- ``bare``: the batch script deconflow renders, submitted with ``sbatch --parsable``, its end
  seen by polling ``scontrol`` every 0.1 s (what SLURM itself costs);
- ``submitit``: ``AutoExecutor`` + ``CommandFunction``, submit -> ``result()``;
- ``deconflow``: ``deconflow materialize --key <cell> --no-analysis`` (a SQLite instance),
  command start -> exit.

Alternating, ``--reps`` each; medians and minima of submit -> complete, and each way's cost
beyond the bare job of the same repetition. deconflow's time is attributed from its run's event
log and the job's work folder: command start -> sbatch (the ``submitting`` mark; the command
submits the job ahead of its run), command start -> first Dagster event, job end (sacct) -> end
seen (the run's ``SLURM job ... ended`` message), -> materialization, -> run success, ->
command exit.

    python bench/slurm_peers.py [--reps 5] [--epochs 2] [--out /tmp/deconflow-peers]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "base__lr0.1_wd0.001_s0"


def _overrides(epochs: int) -> dict:
    return {"epochs": epochs, "hessian_every": 0, "heartbeat_every_s": 1.0}


def _cmd(work: Path, epochs: int) -> list[str]:
    from deconflow.resources.slurm import SlurmResource
    from deconflow.sweep import parse_key

    return SlurmResource().command(parse_key(KEY), "demo", _overrides(epochs), work)


def _resource(slurm_conf: str, prefix: str):
    from deconflow.resources.slurm import SlurmResource

    return SlurmResource(
        partition="gpu", mem="1G", time_limit="00:10:00", slurm_conf=slurm_conf,
        job_name_prefix=prefix, poll_interval_s=5.0,
    )  # fmt: skip


def bare(root: Path, epochs: int, slurm_conf: str, env: dict) -> dict:
    from deconflow.sweep import parse_key

    work = root / "bare" / KEY
    work.mkdir(parents=True)
    res = _resource(slurm_conf, "peerbare")
    script = work / "job.sh"
    script.write_text(res.render_script(parse_key(KEY), _cmd(work, epochs), {}, work))
    t0 = time.time()
    job = subprocess.run(
        ["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    while True:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True
        ).stdout
        if any(f"JobState={s}" in out for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")):
            break
        time.sleep(0.1)
    return {"total_s": time.time() - t0, "job": job, "ok": "JobState=COMPLETED" in out}


def via_submitit(root: Path, epochs: int, slurm_conf: str, env: dict) -> dict:
    import submitit

    work = root / "submitit" / KEY
    work.mkdir(parents=True)
    ex = submitit.AutoExecutor(folder=str(root / "submitit" / "logs"), cluster="slurm")
    ex.update_parameters(
        slurm_partition="gpu", slurm_mem="1G", timeout_min=10, slurm_job_name="peersubmitit"
    )
    t0 = time.time()
    job = ex.submit(submitit.helpers.CommandFunction(_cmd(work, epochs), cwd=str(REPO)))
    job.result()
    return {"total_s": time.time() - t0, "job": job.job_id, "ok": True}


def via_deconflow(root: Path, epochs: int, slurm_conf: str, env: dict) -> dict:
    data = root / "deconflow" / "data"
    toml = root / "deconflow" / "slurm.toml"
    toml.parent.mkdir(parents=True)
    toml.write_text(
        '[slurm]\npartition = "gpu"\nmem = "1G"\ntime_limit = "00:10:00"\n'
        f'slurm_conf = "{slurm_conf}"\njob_name_prefix = "peerdcf"\n'
    )
    cenv = {
        **env,
        "DECONFLOW_DATA": str(data),
        "DAGSTER_HOME": str(root / "deconflow" / "home"),
        "DECONFLOW_COMPUTE": "slurm",
        "DECONFLOW_SLURM_CONFIG": str(toml),
        "DECONFLOW_PROFILE": "demo",
        "DECONFLOW_TRAIN_OVERRIDES": json.dumps(_overrides(epochs)),
    }
    cenv.pop("DECONFLOW_PG_URL", None)
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "deconflow.cli", "materialize", "--key", KEY, "--no-analysis"],
        cwd=REPO,
        env=cenv,
        capture_output=True,
        text=True,
    )
    t_exit = time.time()
    out = {"total_s": t_exit - t0, "ok": r.returncode == 0}
    if r.returncode:
        out["stderr"] = r.stderr[-1500:]
        return out
    out.update(_attribute(cenv, data, t0, t_exit))
    return out


def _attribute(env: dict, data: Path, t0: float, t_exit: float) -> dict:
    """deconflow's time, split by its run's events and the job's work folder."""
    code = """
import json, dagster as dg
with dg.DagsterInstance.get() as inst:
    run = inst.get_runs(limit=1)[0]
    ev = [(e.timestamp, e.dagster_event_type.name if e.dagster_event_type else None,
           e.user_message or "") for e in inst.all_logs(run.run_id)]
    print(json.dumps({"job": run.tags.get("deconflow/slurm_job_id"), "ev": ev}))
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    ev = info["ev"]
    first = min(t for t, _, _ in ev)
    # The submitting mark is written just before sbatch (job_id is rewritten by the run that
    # takes over a job submitted ahead of it).
    t_sub = (data / "work" / KEY / "slurm" / "submitting").stat().st_mtime
    seen = next((t for t, _, m in ev if "ended" in m and "SLURM job" in m), None)
    mat = next((t for t, k, _ in ev if k == "ASSET_MATERIALIZATION"), None)
    ok = next((t for t, k, _ in ev if k == "RUN_SUCCESS"), None)
    job_end = _sacct_end(env, info["job"])
    return {
        "start_to_sbatch_s": t_sub - t0,
        "start_to_first_event_s": first - t0,
        "job_end_to_seen_s": (seen - job_end) if seen and job_end else None,
        "seen_to_materialized_s": (mat - seen) if mat and seen else None,
        "materialized_to_success_s": (ok - mat) if ok and mat else None,
        "success_to_exit_s": (t_exit - ok) if ok else None,
    }


def _sacct_end(env: dict, job: str | None) -> float | None:
    if not job:
        return None
    for _ in range(20):
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", job, "-o", "End"], env=env, capture_output=True,
            text=True,
        ).stdout.strip()  # fmt: skip
        try:
            return time.mktime(time.strptime(out.splitlines()[0], "%Y-%m-%dT%H:%M:%S"))
        except (ValueError, IndexError):
            time.sleep(0.5)
    return None


def summarize(rows: list[dict], args, out: Path, final: bool = False) -> dict:
    """Medians, minima and each way's cost beyond the bare job of the same repetition."""
    report: dict = {
        "reps_done": len({r["rep"] for r in rows}),
        "epochs": args.epochs,
        "rows": rows,
        "ways": {},
    }
    base = {r["rep"]: r["total_s"] for r in rows if r["way"] == "bare"}
    for way in WAYS:
        mine = [r for r in rows if r["way"] == way and r["ok"]]
        tot = [r["total_s"] for r in mine]
        extra = [r["total_s"] - base[r["rep"]] for r in mine if r["rep"] in base]
        report["ways"][way] = {
            "n": len(mine),
            "median_s": statistics.median(tot) if tot else None,
            "min_s": min(tot) if tot else None,
            "beyond_bare_median_s": statistics.median(extra) if extra else None,
            "beyond_bare_min_s": min(extra) if extra else None,
        }
    dcf = [r for r in rows if r["way"] == "deconflow" and r["ok"]]
    parts = [k for k in (dcf[0] if dcf else {}) if k.endswith("_s") and k != "total_s"]
    report["deconflow_attribution_median_s"] = {
        k: statistics.median([r[k] for r in dcf if r.get(k) is not None] or [float("nan")])
        for k in parts
    }
    (out / "peers_report.json").write_text(json.dumps(report, indent=2, default=str))
    if final:
        print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2, default=str))
    return report


WAYS = {"bare": bare, "submitit": via_submitit, "deconflow": via_deconflow}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="/tmp/deconflow-peers")
    args = ap.parse_args()

    from deconflow_dev import slurm_cluster as cluster

    info = cluster.up(cluster.default_state_dir())
    env = {**os.environ, "SLURM_CONF": str(info.slurm_conf)}
    os.environ["SLURM_CONF"] = str(info.slurm_conf)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    rows: list[dict] = []
    for rep in range(args.reps):
        order = list(WAYS) if rep % 2 == 0 else list(reversed(WAYS))
        for way in order:
            res = WAYS[way](out / f"rep{rep}", args.epochs, str(info.slurm_conf), env)
            res.update(way=way, rep=rep)
            rows.append(res)
            print(json.dumps(res, default=str), flush=True)
        summarize(rows, args, out)  # after each rep: a cut-short run still leaves its report
    summarize(rows, args, out, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
