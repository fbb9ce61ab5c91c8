"""GPU check sections through the real train(): correctness, resume, e2e, sharing."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.pop("DECONFLOW_FAULT", None)  # train() also reads faults from the environment

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gpu_common import (  # noqa: E402
    CELL_KEY,
    FULL,
    GOAL_S,
    HESS_TOL_REL,
    LOSS_TOL_NATS,
    MOONSHOT_S,
    RESUME_TOL_NATS,
    RUN_EPOCHS,
    SPE_FULL,
    Ctx,
    Trainer,
    _gen,
    free,
    gb,
    log,
    measure_steps,
    mem_alloc,
    peak_delta,
    rel,
    reset_peak,
)
from bench.gpu_perf import _mfu  # noqa: E402
from bench.train_throughput import sync  # noqa: E402
from deconflow.profiles import get_profile  # noqa: E402
from deconflow.sweep import parse_key  # noqa: E402
from deconflow.training import monitors  # noqa: E402
from deconflow.training.augment import normalize, to_float  # noqa: E402
from deconflow.training.data import synthetic_dataset  # noqa: E402
from deconflow.training.model import build_model  # noqa: E402


def _train_fn():
    from deconflow.training.train import train

    return train


def _family(run_dir: Path, fam: str):
    """A run folder's rows of one metric family, finished or still being written."""
    from deconflow.training.metrics_io import read_family

    df = read_family(Path(run_dir), fam)
    return None if df.empty else df.sort_values("step").reset_index(drop=True)


def _latest_checkpoint(run_dir: Path) -> Path | None:
    p = Path(run_dir) / "checkpoints" / "latest.pt"
    if p.exists():
        return p
    c = sorted(Path(run_dir).rglob("latest.pt"))
    return c[0] if c else None


def _train_cfg(ctx: Ctx, fast: bool, **kw):
    s = ctx.size
    over = dict(
        batch_size=ctx.bs,
        device=ctx.device.type,
        width_mult=ctx.width,
        heartbeat_every_s=60.0,
        hessian_iters=s["hess_iters"],
        hutchinson_samples=s["hess_samples"],
        hessian_batch=s["hess_batch"],
        noise_microbatches=s["noise_micro"],
    )
    if fast:
        over.update(channels_last=True, bf16=True, compile=ctx.compile_ok and ctx.cuda)
        mode = os.environ.get("GPU_CHECK_COMPILE_MODE")
        if mode:
            over.update(compile_mode=mode)
    over.update(kw)
    return get_profile("synthetic", **over)


def _quiet(prefix: str):
    return lambda m: log(f"    {prefix}: {m}")


def s_correctness(ctx: Ctx, rec: dict) -> None:
    import pandas as pd

    train = _train_fn()
    s, dev = ctx.size, ctx.device
    cell = parse_key(CELL_KEY)
    # One epoch of exactly corr_steps steps, with the warm-up stretched so that every step
    # has the learning rate of the same step of a full 50-epoch run (warm-up 5 x 390 steps).
    spe = s["corr_steps"]
    kw = dict(
        n_train=spe * ctx.bs,
        n_test=s["n_test"],
        epochs=1,
        warmup_epochs=FULL.warmup_epochs * SPE_FULL / spe,
        hessian_every=max(1, spe // 2),
    )
    runs = {}
    for label, fast in (("fp32", False), ("fast", True)):
        cfg = _train_cfg(ctx, fast, **kw)
        out = ctx.tmp / f"corr_{label}"
        t = time.monotonic()
        summ = train(cell, cfg, out, log=_quiet(label))
        runs[label] = {"dir": out, "summary": summ, "seconds": time.monotonic() - t, "cfg": cfg}
        log(
            f"  train() {label}: {summ['steps']} steps in {runs[label]['seconds']:.1f} s, outcome "
            f"{summ['outcome']}"
        )
    rec["config"] = {
        "cell": CELL_KEY,
        "profile": "synthetic",
        **kw,
        "fast": "channels_last + bf16" + (" + compile" if runs["fast"]["cfg"].compile else ""),
        "lr_schedule": "lr of the first steps of a full run (warm-up over 1950 steps)",
    }
    rec["train_seconds"] = {k: v["seconds"] for k, v in runs.items()}
    a = _family(runs["fp32"]["dir"], "batch_metrics")
    b = _family(runs["fast"]["dir"], "batch_metrics")
    n = min(s["corr_steps"], len(a), len(b))
    la, lb = a["loss_nats"].to_numpy()[:n], b["loss_nats"].to_numpy()[:n]
    diff = np.abs(lb - la)
    w = s["corr_window"]
    k = n // w
    wa = la[: k * w].reshape(k, w).mean(1)
    wb = lb[: k * w].reshape(k, w).mean(1)
    sm = 20 if n >= 40 else max(1, n // 4)
    ra = pd.Series(la).rolling(sm).mean().to_numpy()[sm - 1 :]
    rb = pd.Series(lb).rolling(sm).mean().to_numpy()[sm - 1 :]
    loss = {
        "steps_compared": n,
        "step1_abs_diff": float(diff[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float((diff / np.abs(la)).max()),
        "window": w,
        "window_means_fp32": wa.tolist(),
        "window_means_fast": wb.tolist(),
        "window_max_abs_diff": float(np.abs(wb - wa).max()) if k else None,
        "smoothing": f"rolling mean of {sm} steps",
        "smoothed_max_abs_diff": float(np.abs(rb - ra).max()),
        "smoothed_max_rel_diff": float((np.abs(rb - ra) / np.abs(ra)).max()),
        "all_finite": bool(np.isfinite(la).all() and np.isfinite(lb).all()),
        "tolerance": f"max |diff| of {w}-step-window means < {LOSS_TOL_NATS} nats",
    }
    loss["pass"] = bool(loss["all_finite"] and k and loss["window_max_abs_diff"] < LOSS_TOL_NATS)
    rec["train_loss"] = loss
    log(
        f"  loss: step-1 diff {loss['step1_abs_diff']:.2e}, max {loss['max_abs_diff']:.3f}, "
        "window-mean max "
        f"{loss['window_max_abs_diff']} -> {'PASS' if loss['pass'] else 'FAIL'}"
    )
    va, vb = (
        _family(runs["fp32"]["dir"], "val_metrics"),
        _family(runs["fast"]["dir"], "val_metrics"),
    )
    if va is not None and vb is not None and len(va) and len(vb):
        rec["val_loss_last"] = {
            "fp32": float(va["val_loss"].iloc[-1]),
            "fast": float(vb["val_loss"].iloc[-1]),
        }
    ctx.save()

    # Hessian on the same weights (the fp32 run's last checkpoint): fp32 NCHW model vs the
    # fast path's model as train.py calls it (channels_last, fp32) vs bf16 autocast.
    ck = _latest_checkpoint(runs["fp32"]["dir"])
    state = torch.load(ck, map_location=dev, weights_only=False)
    d = ctx.data
    hx = normalize(to_float(d.x_train[: s["hess_batch"]]), d.mean, d.std)
    hy = d.y_train[: s["hess_batch"]]
    same = {}
    for label, cl, bf16 in (
        ("fp32", False, False),
        ("fast_path_as_implemented", True, False),
        ("bf16_autocast", True, True),
    ):
        m = build_model(d.num_classes, 3, ctx.width, "batch").to(dev)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        m.load_state_dict(state["model"])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            lam, tr_ = monitors.curvature(
                m, hx, hy, s["hess_iters"], s["hess_samples"], _gen(dev, 0, 7, 2)
            )
        same[label] = {"lambda_max": lam, "trace": tr_}
    ref = same["fp32"]
    for label in ("fast_path_as_implemented", "bf16_autocast"):
        x = same[label]
        x["lambda_rel_diff"] = rel(x["lambda_max"], ref["lambda_max"])
        x["trace_rel_diff"] = rel(x["trace"], ref["trace"])
        x["finite"] = bool(math.isfinite(x["lambda_max"]) and math.isfinite(x["trace"]))
        x["pass"] = bool(
            x["finite"]
            and x["lambda_rel_diff"] <= HESS_TOL_REL
            and x["trace_rel_diff"] <= HESS_TOL_REL
        )
    same["at_step"] = int(state["step"])
    same["tolerance"] = f"relative diff <= {HESS_TOL_REL:.0%} of fp32, same weights and probes"
    rec["hessian_same_weights"] = same
    log(
        "  Hessian same weights: "
        + ", ".join(
            f"{k} lam {same[k]['lambda_max']:.4g} tr {same[k]['trace']:.4g}"
            for k in ("fp32", "fast_path_as_implemented", "bf16_autocast")
        )
    )
    # In-run curvature rows (each run's own weights: includes trajectory divergence).
    ca, cb = (
        _family(runs["fp32"]["dir"], "curvature_metrics"),
        _family(runs["fast"]["dir"], "curvature_metrics"),
    )
    inrun = []
    if ca is not None and cb is not None:
        mrg = ca.merge(cb, on="step", suffixes=("_fp32", "_fast"))
        for _, r in mrg.iterrows():
            e = {
                "step": int(r["step"]),
                "lambda_fp32": r["lambda_max_fp32"],
                "lambda_fast": r["lambda_max_fast"],
                "trace_fp32": r["hessian_trace_fp32"],
                "trace_fast": r["hessian_trace_fast"],
            }
            e["lambda_rel_diff"] = rel(e["lambda_fast"], e["lambda_fp32"])
            e["trace_rel_diff"] = rel(e["trace_fast"], e["trace_fp32"])
            e["finite"] = bool(np.isfinite([e["lambda_fast"], e["trace_fast"]]).all())
            e["within_tol"] = bool(
                e["finite"]
                and e["lambda_rel_diff"] <= HESS_TOL_REL
                and e["trace_rel_diff"] <= HESS_TOL_REL
            )
            inrun.append(e)
    rec["hessian_in_run"] = inrun
    ok = same["fast_path_as_implemented"]["pass"] and all(e["finite"] for e in inrun)
    rec["hessian_pass"] = bool(ok)
    for r in runs.values():
        shutil.rmtree(r["dir"], ignore_errors=True)


def _compare_runs(a_dir: Path, b_dir: Path) -> dict:
    out = {}
    for fam, cols in (
        ("batch_metrics", ["loss_nats", "accuracy", "lr"]),
        ("val_metrics", ["val_loss", "val_accuracy", "grad_norm", "weight_norm"]),
        ("curvature_metrics", ["lambda_max", "hessian_trace"]),
        ("noise_metrics", ["psd_tail_ratio", "grad_variance", "residual_power"]),
    ):
        a, b = _family(a_dir, fam), _family(b_dir, fam)
        if a is None or b is None:
            out[fam] = {"missing": [x for x, y in ((str(a_dir), a), (str(b_dir), b)) if y is None]}
            continue
        r = {"rows": [len(a), len(b)], "same_steps": a["step"].tolist() == b["step"].tolist()}
        if r["same_steps"]:
            for c in cols:
                x, y = a[c].to_numpy(float), b[c].to_numpy(float)
                both_nan = np.isnan(x) & np.isnan(y)
                one_nan = np.isnan(x) ^ np.isnan(y)
                d = np.where(both_nan, 0.0, np.where(one_nan, np.inf, np.abs(x - y)))
                scale = np.maximum(np.abs(np.nan_to_num(x)), 1e-12)
                r[c] = {
                    "exact": bool(np.all((x == y) | both_nan)),
                    "max_abs_diff": float(d.max()) if len(d) else 0.0,
                    "max_rel_diff": float((d / scale).max()) if len(d) else 0.0,
                }
        out[fam] = r
    fams = [v for v in out.values() if "rows" in v]
    out["bit_for_bit"] = bool(
        len(fams) == 4
        and all(
            v["same_steps"] and all(c["exact"] for k, c in v.items() if isinstance(c, dict))
            for v in fams
        )
    )
    return out


def s_resume(ctx: Ctx, rec: dict) -> None:
    train = _train_fn()
    s = ctx.size
    cell = parse_key(CELL_KEY)
    spe = s["resume_n_train"] // ctx.bs
    crash = 2 * spe + max(1, spe // 4) - 2  # a little after the checkpoint at 2 epochs
    cfg = _train_cfg(
        ctx,
        True,
        n_train=s["resume_n_train"],
        n_test=s["resume_n_test"],
        epochs=s["resume_epochs"],
        hessian_every=max(1, spe + spe // 4),
        noise_every_epochs=1,
    )
    rec["config"] = {
        "cell": CELL_KEY,
        "n_train": cfg.n_train,
        "n_test": cfg.n_test,
        "epochs": cfg.epochs,
        "steps": cfg.epochs * spe,
        "hessian_every": cfg.hessian_every,
        "noise_every_epochs": 1,
        "fault": f"crash@{crash}",
        "path": "fast: channels_last + bf16" + (" + compile" if cfg.compile else ""),
    }
    a_dir, b_dir, a2_dir = ctx.tmp / "res_a", ctx.tmp / "res_b", ctx.tmp / "res_a2"
    t = time.monotonic()
    train(cell, cfg, a_dir, log=_quiet("uninterrupted"))
    rec["uninterrupted_s"] = time.monotonic() - t
    try:
        train(cell, cfg.replace(fault=f"crash@{crash}"), b_dir, log=_quiet("crashing"))
        rec["crash"] = "the injected crash did not happen"
    except RuntimeError as e:
        rec["crash"] = str(e)
    partial = _family(b_dir, "batch_metrics")
    rec["rows_after_crash"] = (
        int(partial["step"].max()) if partial is not None and len(partial) else 0
    )
    summ = train(cell, cfg, b_dir, log=_quiet("resumed"))
    rec["resumed_attempts"] = summ.get("attempts")
    rec["resumed_outcome"] = summ.get("outcome")
    cmp_ = _compare_runs(a_dir, b_dir)
    rec["resumed_vs_uninterrupted"] = cmp_
    bm = cmp_.get("batch_metrics", {})
    vm = cmp_.get("val_metrics", {})
    loss_d = bm.get("loss_nats", {}).get("max_abs_diff")
    val_d = vm.get("val_loss", {}).get("max_abs_diff")
    if ctx.left() > 25:
        train(cell, cfg, a2_dir, log=_quiet("uninterrupted again"))
        floor = _compare_runs(a_dir, a2_dir)
        rec["uninterrupted_vs_uninterrupted"] = floor
        rec["nondeterminism_floor_loss_max_abs_diff"] = (
            floor.get("batch_metrics", {}).get("loss_nats", {}).get("max_abs_diff")
        )
    rec["tolerance"] = (
        f"bit-for-bit, else max |diff| of per-step train loss and of val loss <= {RESUME_TOL_NATS} "
        "nats"
    )
    if cmp_["bit_for_bit"]:
        rec["verdict"] = "PASS (bit-for-bit)"
    elif (
        loss_d is not None
        and val_d is not None
        and bm.get("same_steps")
        and loss_d <= RESUME_TOL_NATS
        and val_d <= RESUME_TOL_NATS
    ):
        rec["verdict"] = "PASS (within tolerance)"
    else:
        rec["verdict"] = "FAIL"
    log(
        f"  resume: crash '{rec['crash']}', rows kept to step {rec['rows_after_crash']}, attempts "
        f"{rec['resumed_attempts']}, loss max diff {loss_d}, val diff {val_d} -> {rec['verdict']}"
    )
    for p in (a_dir, b_dir, a2_dir):
        shutil.rmtree(p, ignore_errors=True)


def s_e2e(ctx: Ctx, rec: dict) -> None:
    train = _train_fn()
    s = ctx.size
    cell = parse_key(CELL_KEY)
    epochs = s["e2e_epochs"]
    cfg = _train_cfg(ctx, True, n_train=s["n_train"], n_test=s["n_test"], epochs=epochs)
    # Monitors at their full-profile frequencies (SPEC section 3), as a real run does them.
    cfg = cfg.replace(
        hessian_iters=FULL.hessian_iters if not ctx.args.quick else cfg.hessian_iters,
        hutchinson_samples=FULL.hutchinson_samples
        if not ctx.args.quick
        else cfg.hutchinson_samples,
        hessian_batch=FULL.hessian_batch if not ctx.args.quick else cfg.hessian_batch,
        noise_microbatches=FULL.noise_microbatches
        if not ctx.args.quick
        else cfg.noise_microbatches,
    )
    spe = cfg.n_train // cfg.batch_size
    marks: list[tuple[float, int]] = []

    def progress(info: dict) -> None:
        marks.append((time.monotonic(), int(info["step"])))

    out = ctx.tmp / "e2e"
    free(ctx)
    base = mem_alloc(ctx)
    reset_peak(ctx)
    t0 = time.monotonic()
    summ = train(cell, cfg, out, log=_quiet("e2e"), progress=progress)
    total = time.monotonic() - t0
    peak = peak_delta(ctx, base)
    ends = [t0] + [t for t, st in marks if st % spe == 0]
    ep = np.diff(ends)
    rec["config"] = {
        "profile": "synthetic",
        "epochs": epochs,
        "steps_per_epoch": spe,
        "path": "fast: channels_last + bf16" + (" + compile" if cfg.compile else ""),
        "monitors": f"val {cfg.val_per_epoch}/epoch on {cfg.n_test}, Hessian every "
        f"{cfg.hessian_every} steps ({cfg.hessian_iters} iters + {cfg.hutchinson_samples} "
        "probes), noise every "
        f"{cfg.noise_every_epochs} epochs, latest.pt every validation",
    }
    rec["outcome"] = summ.get("outcome")
    rec["total_s"] = total
    rec["epoch_s"] = ep.tolist()
    rec["peak_mem_gb"] = gb(peak)
    if len(ep) < 2:
        rec["note"] = "fewer than 2 epochs: no steady state"
        return
    steady = float(np.mean(ep[1:]))
    curv = _family(out, "curvature_metrics")
    noise = _family(out, "noise_metrics")
    lo, hi = spe, epochs * spe
    n_h = int(((curv["step"] > lo) & (curv["step"] <= hi)).sum()) if curv is not None else 0
    n_n = int(((noise["step"] > lo) & (noise["step"] <= hi)).sum()) if noise is not None else 0
    n_ep = epochs - 1
    exp_h = n_ep * spe / cfg.hessian_every if cfg.hessian_every else 0.0
    exp_n = n_ep / cfg.noise_every_epochs if cfg.noise_every_epochs else 0.0
    th, tn = ctx.figures.get("t_hess"), ctx.figures.get("t_noise")
    corr = steady
    if th is not None and tn is not None:
        corr = steady - ((n_h - exp_h) * th + (n_n - exp_n) * tn) / n_ep
    rec["steady_epoch_s"] = steady
    rec["window_monitor_counts"] = {
        "hessian": n_h,
        "hessian_expected": exp_h,
        "noise": n_n,
        "noise_expected": exp_n,
    }
    rec["steady_epoch_s_rate_corrected"] = corr
    scale = SPE_FULL / spe  # quick runs have fewer steps per epoch than CIFAR-10's 390
    rec["first_epoch_s"] = float(ep[0])
    rec["run_50ep_s"] = float(ep[0]) + (RUN_EPOCHS - 1) * corr * scale
    rec["run_50ep_s_amortized_no_startup"] = RUN_EPOCHS * corr * scale
    t_step = ctx.figures.get("t_step_fast")
    if t_step:
        train_only = spe * t_step
        rec["train_only_epoch_s"] = train_only
        rec["loop_overhead_pct"] = 100 * (corr - train_only) / train_only
    rec["goal_60s"] = rec["run_50ep_s_amortized_no_startup"] <= GOAL_S
    rec["moonshot_40s"] = rec["run_50ep_s_amortized_no_startup"] <= MOONSHOT_S
    log(
        f"  e2e: epochs {', '.join(f'{x:.1f}' for x in ep)} s; steady {corr:.2f} s/epoch -> "
        "50-epoch run "
        f"{rec['run_50ep_s']:.0f} s ({rec['run_50ep_s_amortized_no_startup']:.0f} s without "
        "startup), "
        f"peak {gb(peak)} GB"
    )
    shutil.rmtree(out, ignore_errors=True)


def s_sharing(ctx: Ctx, rec: dict) -> None:
    s = ctx.size
    work = ctx.tmp / "share"
    work.mkdir(parents=True, exist_ok=True)
    limit = max(30.0, min(ctx.left() - 10, 240.0))
    deadline = time.time() + limit
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(work),
        "--device",
        str(ctx.device),
    ]
    cmd += ["--width-mult", str(ctx.width), "--deadline", str(deadline)]
    if ctx.args.quick:
        cmd.append("--quick")
    if not ctx.compile_ok:
        cmd.append("--no-compile")
    if ctx.args.cpu_compile:
        cmd.append("--cpu-compile")
    procs, logs = [], []
    try:
        for i in range(2):
            lf = open(work / f"worker{i}.log", "w")  # noqa: SIM115
            logs.append(lf)
            procs.append(
                subprocess.Popen(
                    [*cmd, "--worker-id", str(i)], stdout=lf, stderr=subprocess.STDOUT, env=env
                )
            )

        def wait_for(names: list[str]) -> None:
            while not all((work / n).exists() for n in names):
                for i, p in enumerate(procs):
                    if p.poll() is not None and not (work / f"done_{i}").exists():
                        tail = (work / f"worker{i}.log").read_text()[-1500:]
                        raise RuntimeError(f"worker {i} exited with {p.returncode}: {tail}")
                if time.time() > deadline:
                    raise TimeoutError(f"waiting for {names}")
                time.sleep(0.05)

        t = time.monotonic()
        wait_for(["ready_0", "ready_1"])
        rec["workers_ready_s"] = time.monotonic() - t
        log(f"  2 workers ready (started, warmed up) after {rec['workers_ready_s']:.1f} s")
        (work / "go_solo").touch()
        wait_for(["result_solo_0"])
        (work / "go_pair").touch()
        wait_for(["result_pair_0", "result_pair_1"])
        solo = json.loads((work / "result_solo_0").read_text())
        pair = [json.loads((work / f"result_pair_{i}").read_text()) for i in range(2)]
        agg = sum(p["img_s"] for p in pair)
        rec["solo"] = solo
        rec["pair"] = pair
        rec["solo_img_s"] = solo["img_s"]
        rec["pair_aggregate_img_s"] = agg
        rec["aggregate_ratio_2_vs_1"] = agg / solo["img_s"]
        rec["per_run_slowdown"] = solo["img_s"] / (agg / 2)
        rec["measure_seconds"] = s["share_seconds"]
        rec["path"] = "fast: channels_last + bf16" + (" + compile" if ctx.compile_ok else "")
        log(
            f"  solo {solo['img_s']:,.0f} img/s; pair {pair[0]['img_s']:,.0f} + "
            f"{pair[1]['img_s']:,.0f} = "
            f"{agg:,.0f} img/s -> aggregate x{rec['aggregate_ratio_2_vs_1']:.2f}"
        )
        (work / "go_exit").touch()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for lf in logs:
            lf.close()
        rec["worker_log_tails"] = [
            (work / f"worker{i}.log").read_text()[-600:]
            for i in range(2)
            if (work / f"worker{i}.log").exists()
        ]
        shutil.rmtree(work, ignore_errors=True)


def worker_main(args: argparse.Namespace) -> int:
    """One training process of the sharing test: compile + warm up, then measure on cue."""
    work, wid = Path(args.worker), args.worker_id
    ctx = Ctx(args)
    s = ctx.size
    data = synthetic_dataset(n_train=s["share_n_train"], n_test=256).to(ctx.device)
    mode = "default" if ctx.use_compile else None
    tr = Trainer(ctx, fast=True, compile_mode=mode, seed=wid, data=data)
    for _ in range(s["share_warm"]):
        tr.step()
    sync(ctx.device)
    print(f"worker {wid}: warm", flush=True)
    (work / f"ready_{wid}").write_text("1")

    def wait(name: str) -> bool:
        while not (work / name).exists():
            if time.time() > args.deadline or (work / "go_exit").exists():
                return False
            time.sleep(0.01)
        return True

    for phase in ("solo", "pair"):
        if not wait(f"go_{phase}"):
            return 3
        if phase == "solo" and wid != 0:
            continue
        reset_peak(ctx)
        t = time.perf_counter()
        n = 0
        chunk = 10 if ctx.cuda else 1
        while True:
            for _ in range(chunk):
                tr.step()
            n += chunk
            sync(ctx.device)
            el = time.perf_counter() - t
            if el >= s["share_seconds"]:
                break
        res = {
            "worker": wid,
            "steps": n,
            "seconds": el,
            "img_s": n * ctx.bs / el,
            "step_ms": el / n * 1e3,
            "max_allocated_gb": gb(torch.cuda.max_memory_allocated(ctx.device))
            if ctx.cuda
            else None,
            "max_reserved_gb": gb(torch.cuda.max_memory_reserved(ctx.device)) if ctx.cuda else None,
        }
        tmp = work / f"result_{phase}_{wid}.tmp"
        tmp.write_text(json.dumps(res))
        tmp.replace(work / f"result_{phase}_{wid}")
        print(f"worker {wid}: {phase} {res['img_s']:.0f} img/s", flush=True)
    (work / f"done_{wid}").write_text("1")
    return 0


def s_cudagraphs(ctx: Ctx, rec: dict) -> None:
    if not ctx.cuda or not ctx.compile_ok:
        rec["note"] = "needs CUDA and torch.compile"
        return
    torch._dynamo.reset()
    s = ctx.size
    tr = Trainer(ctx, fast=True, compile_mode="reduce-overhead")
    m = measure_steps(tr, s["warm_fast"], s["steps_fast"], s["cap_s"])
    m.update(_mfu(ctx, m["img_s"]))
    rec["fast_compiled_reduce_overhead"] = m
    base = ctx.figures.get("t_step_fast")
    if base:
        rec["speedup_vs_fast_compiled_default"] = base * 1e3 / m["step_ms"]
    rec["note"] = "proposed, not in train.py: CUDA graphs of the compiled forward/backward"
    log(f"  reduce-overhead: {m['step_ms']:.2f} ms/step, {m['img_s']:,.0f} img/s")
