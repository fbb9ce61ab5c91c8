"""GPU check sections on speed: environment, throughput, monitors, memory, profiler."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.pop("DECONFLOW_FAULT", None)  # train() also reads faults from the environment

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.gpu_common import (  # noqa: E402
    HESS_TOL_REL,
    MONITOR_BUDGET,
    N_HESS,
    N_NOISE,
    N_VAL,
    RUN_STEPS,
    SPE_FULL,
    Ctx,
    Trainer,
    _gen,
    bf16_peak_tflops,
    free,
    gb,
    log,
    measure_steps,
    mem_alloc,
    peak_delta,
    rel,
    reset_peak,
)
from bench.train_throughput import forward_flops, sync, timed  # noqa: E402
from deconflow.profiles import VARIANT_SPECS  # noqa: E402
from deconflow.training import monitors  # noqa: E402
from deconflow.training.augment import normalize, to_float  # noqa: E402
from deconflow.training.model import build_model  # noqa: E402


def s_env(ctx: Ctx, rec: dict) -> None:
    dev = ctx.device
    rec["date_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rec["torch"] = torch.__version__
    rec["cuda_runtime"] = torch.version.cuda
    rec["python"] = platform.python_version()
    rec["platform"] = platform.platform()
    rec["cpu_count"] = os.cpu_count()
    rec["device"] = str(dev)
    rec["command"] = os.environ.get("GPU_CHECK_CMD") or " ".join([sys.executable, *sys.argv])
    rec["quick"] = bool(ctx.args.quick)
    rec["width_mult"] = ctx.width
    rec["batch"] = ctx.bs
    rec["compile"] = ctx.use_compile
    rec["budget_s"] = ctx.args.budget
    try:
        rec["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except Exception:
        rec["git_head"] = None
    try:
        import triton

        rec["triton"] = triton.__version__
    except Exception:
        rec["triton"] = None
    rec["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rec["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    rec["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    rec["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    rec["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    if ctx.cuda:
        p = torch.cuda.get_device_properties(dev)
        rec["gpu"] = torch.cuda.get_device_name(dev)
        rec["gpu_capability"] = f"{p.major}.{p.minor}"
        rec["gpu_memory_gb"] = gb(p.total_memory)
        rec["gpu_sm_count"] = p.multi_processor_count
        try:
            q = "name,driver_version,memory.total,power.limit,clocks.max.sm"
            rec["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=15,
            ).stdout.strip()
        except Exception as e:
            rec["nvidia_smi"] = f"unavailable: {e}"
    else:
        rec["gpu"] = None
        rec["cpu"] = platform.processor() or platform.machine()
        rec["torch_threads"] = torch.get_num_threads()
    peak, why = bf16_peak_tflops(rec.get("gpu") or "")
    rec["bf16_peak_tflops"], rec["bf16_peak_source"] = peak, why
    ctx.peak = peak
    # Training-code imports must not pull dagster or duckdb onto a GPU node.
    import importlib

    for m in ("deconflow.training.train", "deconflow.training.run", "deconflow.sweep"):
        try:
            importlib.import_module(m)
        except Exception as e:
            rec.setdefault("import_errors", {})[m] = f"{type(e).__name__}: {e}"
    rec["forbidden_modules_loaded"] = sorted(
        {
            m.split(".")[0]
            for m in sys.modules
            if m.split(".")[0] in ("dagster", "duckdb", "dagster_pipes")
        }
    )
    t = time.monotonic()
    ctx.load_data()
    rec["dataset"] = {
        "n_train": ctx.data.n_train,
        "n_test": ctx.data.n_test,
        "seconds": round(time.monotonic() - t, 2),
        "device_bytes_uint8": int(ctx.data.x_train.numel() + ctx.data.x_test.numel()),
    }
    x = normalize(to_float(ctx.data.x_test[:1]), ctx.mean, ctx.std)
    m = build_model(10, 3, ctx.width, "batch").to(dev)
    ctx.flops_img = 3 * forward_flops(m, x)  # forward + backward ~ 3x forward
    rec["train_gflop_per_image"] = ctx.flops_img / 1e9
    rec["run_50ep_pflop"] = ctx.flops_img * RUN_STEPS * ctx.bs / 1e15
    if peak:
        rec["run_50ep_floor_s_at_peak"] = ctx.flops_img * RUN_STEPS * ctx.bs / (peak * 1e12)
    for k, v in rec.items():
        if not isinstance(v, dict):
            log(f"  {k}: {v}")


def _mfu(ctx: Ctx, img_s: float) -> dict:
    achieved = ctx.flops_img * img_s
    out = {"achieved_tflops": achieved / 1e12}
    if getattr(ctx, "peak", None):
        out["mfu_pct"] = 100 * achieved / (ctx.peak * 1e12)
    return out


def s_throughput(ctx: Ctx, rec: dict) -> None:
    s = ctx.size
    paths = [("fp32_eager", False, None), ("fast_eager", True, None)]
    if ctx.use_compile:
        paths.append(("fast_compiled", True, "default"))
    fast_eager = None
    for name, fast, mode in paths:
        if ctx.left() < 20:
            rec[name] = {"skipped": "out of time budget"}
            continue
        free(ctx)
        base = mem_alloc(ctx)
        reset_peak(ctx)
        log(f"  {name}: building, warm-up{' + compile' if mode else ''} ...")
        try:
            tr = Trainer(ctx, fast=fast, compile_mode=mode)
            warm = s["warm_fast"] if fast else s["warm_fp32"]
            steps = s["steps_fast"] if fast else s["steps_fp32"]
            m = measure_steps(tr, warm, steps, s["cap_s"])
        except Exception as e:
            rec[name] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:],
            }
            log(f"  {name}: FAILED {type(e).__name__}: {e}")
            if mode:
                ctx.compile_ok = False
            continue
        m.update(_mfu(ctx, m["img_s"]))
        m["peak_mem_gb"] = gb(peak_delta(ctx, base))
        rec[name] = m
        ctx.figures[f"t_step_{name}"] = m["step_ms"] / 1e3
        log(
            f"  {name}: {m['step_ms']:.2f} ms/step, {m['img_s']:,.0f} img/s, "
            f"50-epoch run {m['run_50ep_train_s']:,.0f} s, first step {m['first_step_s']:.1f} s"
            + (f", MFU {m['mfu_pct']:.1f}%" if "mfu_pct" in m else "")
        )
        if name == "fast_eager":
            fast_eager = tr
        elif name == "fast_compiled":
            ctx.fast = tr
        else:
            del tr
        ctx.save()
    if ctx.fast is None:
        ctx.fast = fast_eager
        rec["fast_path_used_later"] = "fast_eager (no compiled trainer)"
    else:
        del fast_eager
        rec["fast_path_used_later"] = "fast_compiled"
    free(ctx)
    best = rec.get("fast_compiled", {}).get("step_ms") or rec.get("fast_eager", {}).get("step_ms")
    if best and rec.get("fp32_eager", {}).get("step_ms"):
        rec["speedup_fast_vs_fp32"] = rec["fp32_eager"]["step_ms"] / best
    if best:
        ctx.figures["t_step_fast"] = best / 1e3
    # Proposed (not in train.py): cudnn autotuning of convolution algorithms.
    if ctx.cuda and ctx.fast is not None and ctx.left() > 30:
        prev = torch.backends.cudnn.benchmark
        try:
            torch.backends.cudnn.benchmark = True
            m = measure_steps(ctx.fast, s["warm_fast"], s["steps_fast"], s["cap_s"])
            m.update(_mfu(ctx, m["img_s"]))
            rec["proposed_fast_cudnn_benchmark"] = m
            log(
                f"  proposed cudnn.benchmark=True: {m['step_ms']:.2f} ms/step, {m['img_s']:,.0f} "
                "img/s"
            )
        except Exception as e:
            rec["proposed_fast_cudnn_benchmark"] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            torch.backends.cudnn.benchmark = prev


def _fast_trainer(ctx: Ctx) -> Trainer:
    if ctx.fast is None:
        log("  (no fast trainer from the throughput section: building an eager one)")
        ctx.fast = Trainer(ctx, fast=True)
        for _ in range(3):
            ctx.fast.step()
    return ctx.fast


def s_monitors(ctx: Ctx, rec: dict) -> None:
    s, dev, d = ctx.size, ctx.device, ctx.data
    tr = _fast_trainer(ctx)
    model, fwd = tr.model, tr.fwd
    amp = tr.amp
    mean, std = tr.mean, tr.std
    x_test = normalize(to_float(d.x_test), mean, std)  # as train.py: NCHW fp32
    y_test = d.y_test
    n_test = len(x_test)
    rec["n_test"] = n_test
    params = tr.params

    try:  # the real validation of train.py where it is a function (it tracks the code)
        from deconflow.training.train import validate as train_validate
    except ImportError:
        train_validate = None
    rec["validation_impl"] = (
        "deconflow.training.train.validate" if train_validate else "mirror of train.py's block"
    )
    amp_obj = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tr.fast)

    def validate_as_implemented() -> list[float]:
        """train.py's validation: compiled fwd, no_grad, autocast, chunks of 1000, NCHW."""
        if train_validate is not None:
            vloss, vcorrect = train_validate(model, fwd, x_test, y_test, amp_obj)
        else:
            model.eval()
            with torch.no_grad(), amp():
                vloss = torch.zeros((), device=dev)
                vcorrect = torch.zeros((), device=dev)
                for j in range(0, n_test, 1000):
                    logits = fwd(x_test[j : j + 1000]).float()
                    y = y_test[j : j + 1000]
                    vloss += nn.functional.cross_entropy(logits, y, reduction="sum")
                    vcorrect += (logits.argmax(1) == y).sum()
            model.train()
        weight_norm = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in params]))
        return torch.stack([vloss / n_test, vcorrect / n_test, weight_norm]).tolist()

    x_test_cl = x_test.contiguous(memory_format=torch.channels_last)

    def make_fast_val(net, batch: int, inference: bool):
        """Proposed: bf16 autocast, big batches, channels_last input, inference_mode."""

        def run() -> list[float]:
            model.eval()
            ctxm = torch.inference_mode() if inference else torch.no_grad()
            with ctxm, torch.autocast(dev.type, dtype=torch.bfloat16):
                vloss = torch.zeros((), device=dev)
                vcorrect = torch.zeros((), device=dev)
                for j in range(0, n_test, batch):
                    logits = net(x_test_cl[j : j + batch]).float()
                    vloss += nn.functional.cross_entropy(
                        logits, y_test[j : j + batch], reduction="sum"
                    )
                    vcorrect += (logits.argmax(1) == y_test[j : j + batch]).sum()
            model.train()
            weight_norm = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in params]))
            return torch.stack([vloss / n_test, vcorrect / n_test, weight_norm]).tolist()

        return run

    def time_it(label: str, fn, repeat: int) -> dict:
        t = time.perf_counter()
        val = fn()
        sync(dev)
        first = time.perf_counter() - t
        steady = timed(fn, dev, repeat=repeat)
        log(f"  {label}: first call {first:.2f} s, steady {steady * 1e3:.1f} ms")
        return {"first_call_s": first, "seconds": steady, "value": val}

    vals = {}
    vals["as_implemented"] = time_it(
        f"validation as implemented ({'compiled' if tr.compile_mode else 'eager'} fwd, "
        f"{'bf16' if tr.fast else 'fp32'}, batch 1000, NCHW input, no_grad)",
        validate_as_implemented,
        s["val_repeat"],
    )
    ctx.save()
    variants = [
        ("proposed_eager_b2000", model, 2000, True),
        ("proposed_eager_b1000", model, 1000, True),
    ]
    if tr.compile_mode and ctx.left() > 200:  # a second eval compile: only when time allows
        variants.append(("proposed_compiled_b2000", fwd, 2000, False))
    for label, net, batch, inference in variants:
        if ctx.left() < 15:
            vals[label] = {"skipped": "out of time budget"}
            continue
        try:
            vals[label] = time_it(
                f"validation {label} (bf16, batch {batch}, channels_last, "
                f"{'inference_mode' if inference else 'no_grad'})",
                make_fast_val(net, batch, inference),
                s["val_repeat"],
            )
            ref = vals["as_implemented"]["value"]
            vals[label]["val_loss_abs_diff_vs_as_implemented"] = abs(
                vals[label]["value"][0] - ref[0]
            )
            vals[label]["val_acc_abs_diff_vs_as_implemented"] = abs(
                vals[label]["value"][1] - ref[1]
            )
        except Exception as e:
            vals[label] = {"error": f"{type(e).__name__}: {e}"}
        ctx.save()
    rec["validation"] = vals

    # Hessian lambda_max + trace exactly as train.py calls it (eager model, fp32, NCHW input).
    hx = normalize(to_float(d.x_train[: s["hess_batch"]]), mean, std)
    hy = d.y_train[: s["hess_batch"]]
    iters, samples = s["hess_iters"], s["hess_samples"]
    rec["hessian_config"] = {"iters": iters, "samples": samples, "batch": s["hess_batch"]}

    def hess(bf16: bool):
        def run():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                return monitors.curvature(model, hx, hy, iters, samples, _gen(dev, 0, 500, 2))

        return run

    hres = {}
    for label, bf16 in (("as_implemented_fp32", False), ("proposed_bf16_autocast", True)):
        if ctx.left() < 15:
            hres[label] = {"skipped": "out of time budget"}
            continue
        try:
            hres[label] = time_it(f"Hessian {label}", hess(bf16), s["hess_repeat"])
        except Exception as e:
            hres[label] = {"error": f"{type(e).__name__}: {e}"}
    a, b = hres.get("as_implemented_fp32", {}), hres.get("proposed_bf16_autocast", {})
    if "value" in a and "value" in b:
        b["lambda_rel_diff_vs_fp32"] = rel(b["value"][0], a["value"][0])
        b["trace_rel_diff_vs_fp32"] = rel(b["value"][1], a["value"][1])
        b["within_tol"] = (
            b["lambda_rel_diff_vs_fp32"] <= HESS_TOL_REL
            and b["trace_rel_diff_vs_fp32"] <= HESS_TOL_REL
        )
    rec["hessian"] = hres
    ctx.save()

    # Gradient noise as train.py does it (8 micro-batches of 128, eager, fp32).
    g = _gen(torch.device("cpu"), 0, 780, 3)
    picks = torch.randint(0, len(d.y_train), (s["noise_micro"], ctx.bs), generator=g).to(dev)
    xs = [normalize(to_float(d.x_train[p]), mean, std) for p in picks]
    ys = [d.y_train[p] for p in picks]
    signal = np.random.default_rng(0).normal(size=2 * SPE_FULL)
    try:
        rec["grad_noise"] = time_it(
            "gradient noise as implemented", lambda: monitors.grad_noise(model, xs, ys, signal), 1
        )
    except Exception as e:
        rec["grad_noise"] = {"error": f"{type(e).__name__}: {e}"}

    # Checkpoint writes (every validation point in the full profile): not a monitor, but in
    # the loop. latest.pt (model + optimizer) at every validation point, best-k model saves.
    try:
        from deconflow.training.checkpoints import Checkpoints

        ck = Checkpoints(ctx.tmp / "ckpt_bench", 3)
        state = {
            "model": model.state_dict(),
            "optimizer": tr.opt.state_dict(),
            "step": 1,
            "wall_time_s": 0.0,
            "attempts": 1,
            "fingerprint": {},
        }
        rec["checkpoint"] = time_it("checkpoint save_latest", lambda: ck.save_latest(state), 2)
        rec["checkpoint"].pop("value", None)
        rec["checkpoint"]["bytes"] = ck.latest_path.stat().st_size
        shutil.rmtree(ctx.tmp / "ckpt_bench", ignore_errors=True)
    except Exception as e:
        rec["checkpoint"] = {"error": f"{type(e).__name__}: {e}"}

    # Overhead of a 50-epoch full run, against the fast path's training time.
    t_step = ctx.figures.get("t_step_fast") or ctx.figures.get("t_step_fp32_eager")
    if not t_step:
        rec["overhead"] = {"error": "no training step time (throughput section failed)"}
        return
    t_train = RUN_STEPS * t_step

    def sec(x: dict) -> float | None:
        return x.get("seconds") if isinstance(x, dict) else None

    t_val = sec(vals.get("as_implemented", {}))
    t_h = sec(hres.get("as_implemented_fp32", {}))
    t_n = sec(rec.get("grad_noise", {}))
    t_ck = sec(rec.get("checkpoint", {}))
    ctx.figures.update(t_val=t_val, t_hess=t_h, t_noise=t_n, t_ckpt=t_ck)

    def overhead(tv, th, tn) -> dict:
        parts = {
            "validation_s": None if tv is None else N_VAL * tv,
            "hessian_s": None if th is None else N_HESS * th,
            "grad_noise_s": None if tn is None else N_NOISE * tn,
        }
        total = sum(v for v in parts.values() if v is not None)
        out = {k: v for k, v in parts.items()}
        out.update(
            {
                k.replace("_s", "_pct"): (None if v is None else 100 * v / t_train)
                for k, v in parts.items()
            }
        )
        out["total_s"] = total
        out["total_pct"] = 100 * total / t_train
        out["complete"] = all(v is not None for v in parts.values())
        out["within_15pct_budget"] = out["total_pct"] <= 100 * MONITOR_BUDGET
        return out

    fast_vals = [
        (k, sec(v)) for k, v in vals.items() if k.startswith("proposed") and sec(v) is not None
    ]
    best_val = min(fast_vals, key=lambda kv: kv[1]) if fast_vals else (None, None)
    hb = hres.get("proposed_bf16_autocast", {})
    use_bf16_h = (
        bool(hb.get("within_tol")) and sec(hb) is not None and (t_h is None or sec(hb) < t_h)
    )
    rec["overhead"] = {
        "counts_per_50_epoch_run": {"validation": N_VAL, "hessian": N_HESS, "grad_noise": N_NOISE},
        "train_s_fast_path": t_train,
        "as_implemented": overhead(t_val, t_h, t_n),
        "proposed": {
            "validation_variant": best_val[0],
            "hessian_variant": "proposed_bf16_autocast" if use_bf16_h else "as_implemented_fp32",
            **overhead(
                best_val[1] if best_val[1] is not None else t_val,
                sec(hb) if use_bf16_h else t_h,
                t_n,
            ),
        },
        "checkpoint_latest_s": None if t_ck is None else N_VAL * t_ck,
        "checkpoint_latest_pct": None if t_ck is None else 100 * N_VAL * t_ck / t_train,
    }
    o = rec["overhead"]
    log(
        "  monitor overhead (50-epoch run): as implemented "
        f"{o['as_implemented']['total_pct']:.1f}%, "
        f"proposed {o['proposed']['total_pct']:.1f}% (validation: {best_val[0]}); "
        f"checkpoints +{o['checkpoint_latest_pct'] or 0:.1f}%"
    )


def s_memory(ctx: Ctx, rec: dict) -> None:
    if not ctx.cuda:
        rec["note"] = "CPU run: torch.cuda memory statistics are not available; steps run only"
    s = ctx.size
    rows = {}
    for variant in VARIANT_SPECS:
        for path, fast in (("fp32", False), ("fast_eager", True)):
            key = f"{variant}/{path}"
            if ctx.left() < 10:
                rows[key] = {"skipped": "out of time budget"}
                continue
            try:
                free(ctx)
                base = mem_alloc(ctx)
                reset_peak(ctx)
                tr = Trainer(ctx, variant=variant, fast=fast)
                for _ in range(s["mem_steps"]):
                    tr.step()
                train_peak = peak_delta(ctx, base)
                # The Hessian probe (double backward through the graph) at the same weights.
                hx = normalize(to_float(ctx.data.x_train[: s["hess_batch"]]), tr.mean, tr.std)
                hy = ctx.data.y_train[: s["hess_batch"]]
                reset_peak(ctx)
                monitors.curvature(tr.model, hx, hy, 2, 1, _gen(ctx.device, 0, 1, 2))
                hess_peak = peak_delta(ctx, base)
                n_params = sum(p.numel() for p in tr.params)
                rows[key] = {
                    "train_step_peak_gb": gb(train_peak),
                    "hessian_peak_gb": gb(hess_peak),
                    "params_m": n_params / 1e6,
                    "losses_finite": bool(np.all(np.isfinite(tr.last_losses(s["mem_steps"])))),
                }
                del tr, hx, hy
                log(f"  {key}: train step {gb(train_peak)} GB, Hessian probe {gb(hess_peak)} GB")
            except Exception as e:
                rows[key] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  {key}: FAILED {type(e).__name__}: {e}")
    free(ctx)
    rec["per_variant"] = rows
    comp = ctx.R["sections"].get("throughput", {}).get("fast_compiled", {})
    if "peak_mem_gb" in comp:
        rec["base_fast_compiled_train_peak_gb"] = comp["peak_mem_gb"]
    if ctx.cuda:
        # The dataset lives on the device too: uint8 train + test, float test set, hess batch.
        d = ctx.data
        data_bytes = d.x_train.numel() + d.x_test.numel() + 4 * d.x_test.numel()
        rec["dataset_on_device_gb"] = gb(data_bytes)
        rec["note"] = (
            "peaks are torch.cuda.max_memory_allocated deltas over what was allocated before the "
            "model was built (model + grads + optimizer state + activations + workspaces); a "
            "whole training process adds the dataset on the device (dataset_on_device_gb), "
            "the caching allocator's slack and the CUDA context (~0.5 GB). Plan: 2-6 GB."
        )
        worst = max(
            (
                max(v.get("train_step_peak_gb") or 0, v.get("hessian_peak_gb") or 0)
                for v in rows.values()
            ),
            default=0,
        )
        rec["max_peak_gb"] = worst
        rec["max_process_estimate_gb"] = worst + gb(data_bytes) + 0.5
        rec["within_plan_6gb"] = rec["max_process_estimate_gb"] <= 6.0


def s_profiler(ctx: Ctx, rec: dict) -> None:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    tr = _fast_trainer(ctx)
    n = ctx.size["prof_steps"]
    for _ in range(3):
        tr.step()
    sync(ctx.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            tr.step()
        sync(ctx.device)
    wall = time.perf_counter() - t
    ka = prof.key_averages()
    if ctx.cuda:
        attr = "self_device_time_total"
        evs = [e for e in ka if getattr(e, "device_type", None) == DeviceType.CUDA]
        if not evs:
            evs = [e for e in ka if getattr(e, attr, 0) > 0]
    else:
        attr = "self_cpu_time_total"
        evs = list(ka)
    evs.sort(key=lambda e: getattr(e, attr, 0), reverse=True)
    total_us = sum(getattr(e, attr, 0) for e in evs)
    rows = []
    for e in evs[:10]:
        us = getattr(e, attr, 0)
        rows.append(
            {
                "name": e.key[:160],
                "calls": e.count,
                "self_ms_total": us / 1e3,
                "self_ms_per_step": us / 1e3 / n,
                "pct": 100 * us / max(total_us, 1e-9),
            }
        )

    def kind(name: str) -> str:
        low = name.lower()
        if low.startswith("triton"):
            return "triton (inductor-fused)"
        if any(
            k in low
            for k in (
                "conv",
                "cudnn",
                "xmma",
                "gemm",
                "cutlass",
                "implicit",
                "wgrad",
                "dgrad",
                "sm90",
                "sm80",
            )
        ):
            return "convolution / gemm"
        if any(k in low for k in ("memcpy", "memset")):
            return "memcpy / memset"
        if "foreach" in low or "multi_tensor" in low:
            return "optimizer (foreach)"
        return "other"

    by_kind: dict[str, float] = {}
    for e in evs:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + getattr(e, attr, 0)
    rec["what"] = "CUDA kernels by self time" if ctx.cuda else "CPU ops by self time (no GPU)"
    rec["steps"] = n
    rec["path"] = f"fast ({'compiled' if tr.compile_mode else 'eager'})"
    rec["wall_s"] = wall
    rec["wall_ms_per_step"] = wall / n * 1e3
    rec["kernel_ms_per_step"] = total_us / 1e3 / n
    rec["kernel_busy_fraction"] = total_us / 1e6 / wall
    rec["top10"] = rows
    rec["by_kind_pct"] = {
        k: 100 * v / max(total_us, 1e-9) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
    }
    rec["kernel_launches_per_step"] = sum(e.count for e in evs) / n
    for sort_by in (
        ("self_cuda_time_total", "self_device_time_total") if ctx.cuda else ("self_cpu_time_total",)
    ):
        try:
            rec["table"] = ka.table(sort_by=sort_by, row_limit=15, max_name_column_width=70)
            break
        except Exception as e:
            rec["table"] = f"table failed: {e}"
    log(
        f"  {n} steps: wall {rec['wall_ms_per_step']:.2f} ms/step, kernels "
        f"{rec['kernel_ms_per_step']:.2f} "
        f"ms/step (busy {100 * rec['kernel_busy_fraction']:.0f}%), "
        f"{rec['kernel_launches_per_step']:.0f} launches/step"
    )
    for r in rows[:5]:
        log(f"    {r['pct']:5.1f}%  {r['name'][:100]}")
