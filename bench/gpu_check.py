"""GPU figures of issue 15: one time-boxed run that measures everything the issue asks.

    bash bench/gpu_check.sh                 # the real run (H100/H200, ~6-7 min)
    python3 bench/gpu_check.py --quick --device cpu --out /tmp/x   # smoke test on a CPU

Sections (each time-boxed and wrapped: one that fails records its error and the rest go on):

  env          GPU, torch, date, precision settings
  throughput   img/s and extrapolated seconds per 50-epoch `full` run: fp32 eager, the fast
               path without and with torch.compile (channels_last + bf16 autocast); MFU
               against the bf16 dense peak; a proposed cudnn.benchmark variant
  monitors     validation / Hessian / gradient noise / checkpoint cost, overhead in % of
               training time for a 50-epoch run, as implemented and proposed faster variants
  memory       peak GPU memory of a training step and of the Hessian probe per variant
  profiler     top CUDA kernels over ~20 fast-path steps
  correctness  fast path vs fp32 through the real train(): first 200 train losses, Hessian
               lambda_max / trace on the same weights and in-run
  sharing      2 training processes on one GPU vs 1 (aggregate img/s)
  resume       crash@STEP + resume through train() vs an uninterrupted run
  e2e          a real train() of a few epochs with every monitor: seconds per epoch, the
               50-epoch extrapolation, peak memory
  cudagraphs   optional: torch.compile(mode="reduce-overhead") step time

Writes OUT/gpu_figures.json and OUT/gpu_figures.md after every section (OUT: --out, else
the OUT environment variable, else bench_out/). Nothing here needs dagster or duckdb.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
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

from bench.train_throughput import BF16_PEAK_TFLOPS, forward_flops, sync, timed  # noqa: E402
from deconflow.sweep import parse_key  # noqa: E402
from deconflow.training import monitors  # noqa: E402
from deconflow.training.augment import normalize, random_resized_crop_flip, to_float  # noqa: E402
from deconflow.training.data import synthetic_dataset  # noqa: E402
from deconflow.training.model import build_model  # noqa: E402

try:  # profiles moved out of the training package during the restructuring
    from deconflow.profiles import VARIANT_SPECS, get_profile
except ImportError:  # pragma: no cover - older layout
    from deconflow.training.config import VARIANT_SPECS, get_profile

FULL = get_profile("full")
RUN_EPOCHS = FULL.epochs  # 50
SPE_FULL = 50_000 // FULL.batch_size  # 390 steps per epoch of CIFAR-10 at batch 128
RUN_STEPS = RUN_EPOCHS * SPE_FULL  # 19,500
N_VAL = RUN_EPOCHS * FULL.val_per_epoch  # 200 validation passes
N_HESS = RUN_STEPS // FULL.hessian_every  # 39 Hessian probes
N_NOISE = RUN_EPOCHS // FULL.noise_every_epochs  # 25 gradient-noise measurements
CELL_KEY = "base__lr0.1_wd0.0001_s0"
BENCH_LR = 0.05  # constant lr of the timing/memory/profiler steps (the value does not matter)
GOAL_S, MOONSHOT_S, MONITOR_BUDGET = 60.0, 40.0, 0.15
LOSS_TOL_NATS = 0.05  # fast vs fp32: max |diff| of 50-step-window means of the train loss
HESS_TOL_REL = 0.10  # fast vs fp32: lambda_max and trace, relative
RESUME_TOL_NATS = 1e-3  # resumed vs uninterrupted: max |diff| of per-step train loss

SIZES = {
    "full": dict(
        bs=FULL.batch_size,
        n_train=50_000,
        n_test=10_000,
        warm_fp32=5,
        warm_fast=15,
        steps_fp32=60,
        steps_fast=200,
        cap_s=15.0,
        val_repeat=2,
        hess_repeat=1,
        hess_iters=FULL.hessian_iters,
        hess_samples=FULL.hutchinson_samples,
        hess_batch=FULL.hessian_batch,
        noise_micro=FULL.noise_microbatches,
        mem_steps=3,
        prof_steps=20,
        corr_steps=200,
        corr_window=50,
        share_n_train=8192,
        share_warm=15,
        share_seconds=6.0,
        resume_n_train=4096,
        resume_n_test=1000,
        resume_epochs=3,
        e2e_epochs=3,
    ),
    "quick": dict(
        bs=32,
        n_train=256,
        n_test=128,
        warm_fp32=2,
        warm_fast=2,
        steps_fp32=3,
        steps_fast=3,
        cap_s=10.0,
        val_repeat=1,
        hess_repeat=1,
        hess_iters=3,
        hess_samples=2,
        hess_batch=16,
        noise_micro=2,
        mem_steps=1,
        prof_steps=3,
        corr_steps=8,
        corr_window=2,
        share_n_train=256,
        share_warm=2,
        share_seconds=2.0,
        resume_n_train=128,
        resume_n_test=64,
        resume_epochs=3,
        e2e_epochs=2,
    ),
}

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """The same 63-bit seed mixing as deconflow.training.train._seed."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _gen(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(*parts))


def clean(obj):
    """JSON-safe: numpy scalars to Python, non-finite floats to strings."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return clean(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def gb(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / 1e9, 3)


def bf16_peak_tflops(name: str) -> tuple[float | None, str]:
    """Dense bf16 peak; SXM figure from bench.train_throughput, PCIe/NVL boards lower."""
    if "H100" in name and "PCIe" in name:
        return 756.0, "H100 PCIe dense bf16"
    if ("H100" in name or "H200" in name) and "NVL" in name:
        return 835.0, "H100/H200 NVL dense bf16"
    for k, v in BF16_PEAK_TFLOPS.items():
        if k in name:
            return v, f"{k} SXM dense bf16"
    return None, "unknown GPU: no MFU"


class Ctx:
    """What the sections share: args, device, the dataset on the device, results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.size = SIZES["quick" if args.quick else "full"]
        self.width = args.width_mult
        self.bs = self.size["bs"]
        self.out = Path(args.out)
        self.deadline = T0 + args.budget
        self.use_compile = not args.no_compile and (self.cuda or args.cpu_compile)
        self.compile_ok = self.use_compile
        self.data = None
        self.fast = None  # the fast-path Trainer (compiled when it compiled)
        self.figures: dict = {}  # cross-section numbers (step times, monitor times)
        self.R: dict = {"schema": 1, "meta": {}, "sections": {}}
        self.tmp = None if args.worker else Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def load_data(self) -> None:
        s = self.size
        self.data = synthetic_dataset(n_train=s["n_train"], n_test=s["n_test"]).to(self.device)
        self.mean, self.std = self.data.mean, self.data.std

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        j = self.out / "gpu_figures.json"
        tmp = j.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(clean(self.R), indent=1))
        tmp.replace(j)
        try:
            text = render_md(self.R)
        except Exception as e:  # the JSON is the record; never lose it to a rendering bug
            text = f"# GPU figures\n\nmarkdown rendering failed: {type(e).__name__}: {e}\n"
        (self.out / "gpu_figures.md").write_text(text)


def mem_alloc(ctx: Ctx) -> int | None:
    return torch.cuda.memory_allocated(ctx.device) if ctx.cuda else None


def reset_peak(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_delta(ctx: Ctx, base: int | None) -> int | None:
    if not ctx.cuda:
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(ctx.device) - (base or 0)


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Trainer:
    """A model, its optimizer and the step of deconflow/training/train.py.

    Same data pipeline (per-epoch randperm, per-step generators, batched on-device crop +
    flip of uint8 images, normalisation), same fast path (channels_last, bf16 autocast with
    fp32 loss, torch.compile of the model), same optimizer per variant, no host syncs.
    The lr is constant (it changes nothing in timing or memory).
    """

    def __init__(
        self,
        ctx: Ctx,
        variant: str = "base",
        fast: bool = False,
        compile_mode: str | None = None,
        seed: int = 0,
        data=None,
    ) -> None:
        self.ctx, self.dev = ctx, ctx.device
        self.data = data if data is not None else ctx.data
        spec = VARIANT_SPECS[variant]
        torch.manual_seed(seed)
        d = self.data
        model = build_model(
            d.num_classes, d.x_train.shape[1], ctx.width * spec.width_factor, spec.norm
        )
        self.model = model.to(self.dev)
        if fast:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if spec.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.params, lr=BENCH_LR, weight_decay=1e-4)
        else:
            self.opt = torch.optim.SGD(self.params, lr=BENCH_LR, momentum=0.9, weight_decay=1e-4)
        self.clip = spec.clip_grad_norm
        if compile_mode is None:
            self.fwd = self.model
        elif compile_mode == "default":
            self.fwd = torch.compile(self.model)
        else:
            self.fwd = torch.compile(self.model, mode=compile_mode)
        self.cudagraphs = compile_mode == "reduce-overhead"
        self.fast, self.compile_mode, self.seed = fast, compile_mode, seed
        self.bs = ctx.bs
        self.n = len(d.y_train)
        self.spe = max(1, self.n // self.bs)
        self.mean, self.std = d.mean.to(self.dev), d.std.to(self.dev)
        self.buf = torch.zeros(1024, device=self.dev)
        self.perm, self.perm_epoch = None, -1
        self.steps_done = 0

    def amp(self):
        return torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.fast)

    def step(self) -> None:
        step, d = self.steps_done, self.data
        epoch = step // self.spe
        if self.perm_epoch != epoch:
            perm = torch.randperm(self.n, generator=_gen(torch.device("cpu"), self.seed, epoch))
            self.perm, self.perm_epoch = perm.to(self.dev), epoch
        i0 = (step % self.spe) * self.bs
        idx = self.perm[i0 : i0 + self.bs]
        x = random_resized_crop_flip(
            d.x_train[idx], _gen(self.dev, self.seed, step, 1), FULL.crop_scale, FULL.crop_ratio
        )
        x, y = normalize(x, self.mean, self.std), d.y_train[idx]
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        for g in self.opt.param_groups:
            g["lr"] = BENCH_LR
        self.opt.zero_grad(set_to_none=True)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.amp():
            logits = self.fwd(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        correct = (logits.argmax(1) == y).sum()
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.buf[step % 512] = loss.detach()
        self.buf[512 + step % 512] = correct
        self.steps_done += 1

    def last_losses(self, n: int) -> list[float]:
        k = min(n, self.steps_done, 512)
        idx = [(self.steps_done - k + i) % 512 for i in range(k)]
        return self.buf[idx].tolist()


def measure_steps(tr: Trainer, warm: int, steps: int, cap_s: float) -> dict:
    """First step (compile), warm-up, then synchronised timing of steady-state steps."""
    dev = tr.dev
    sync(dev)
    t = time.perf_counter()
    tr.step()
    sync(dev)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(max(0, warm - 1)):
        tr.step()
    sync(dev)
    warm_s = time.perf_counter() - t
    n, chunk = 0, max(1, min(20, steps))
    t = time.perf_counter()
    while n < steps:
        for _ in range(min(chunk, steps - n)):
            tr.step()
        n += min(chunk, steps - n)
        sync(dev)
        if time.perf_counter() - t > cap_s:
            break
    el = time.perf_counter() - t
    t_step = el / n
    losses = tr.last_losses(n)
    return {
        "first_step_s": round(first, 3),
        "warmup_steps": warm,
        "warmup_s": round(warm_s, 3),
        "measured_steps": n,
        "measured_s": round(el, 3),
        "step_ms": t_step * 1e3,
        "img_s": tr.bs / t_step,
        "run_50ep_train_s": RUN_STEPS * t_step,
        "losses_finite": bool(np.all(np.isfinite(losses))),
        "last_loss": losses[-1] if losses else None,
    }


# ------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------


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


def _train_fn():
    from deconflow.training.train import train

    return train


def _family(run_dir: Path, fam: str):
    import pandas as pd

    p = Path(run_dir) / f"{fam}.parquet"
    if not p.exists():
        cands = sorted(Path(run_dir).rglob(f"{fam}*.parquet"))
        if not cands:
            return None
        p = cands[0]
    return pd.read_parquet(p).sort_values("step").reset_index(drop=True)


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


SECTIONS = [
    # name, function, minimum seconds left to start it
    ("env", s_env, 0),
    ("throughput", s_throughput, 40),
    ("monitors", s_monitors, 30),
    ("memory", s_memory, 15),
    ("profiler", s_profiler, 15),
    ("correctness", s_correctness, 40),
    ("sharing", s_sharing, 50),
    ("resume", s_resume, 35),
    ("e2e", s_e2e, 35),
    ("cudagraphs", s_cudagraphs, 80),
]


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _f(x, fmt: str = ".2f", none: str = "n/a") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    try:
        return format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def ctx_warm_steps(R: dict) -> int:
    quick = R["sections"].get("env", {}).get("quick")
    return SIZES["quick" if quick else "full"]["share_warm"]


def render_md(R: dict) -> str:
    S = R["sections"]
    env = S.get("env", {})
    L = ["# GPU figures (issue 15)", ""]
    L.append(
        f"- GPU: **{env.get('gpu') or env.get('cpu') or 'n/a'}** "
        f"({env.get('gpu_memory_gb', 'n/a')} GB, "
        f"cc {env.get('gpu_capability', 'n/a')}); torch {env.get('torch')}, CUDA "
        f"{env.get('cuda_runtime')}, "
        f"cuDNN {env.get('cudnn')}, triton {env.get('triton')}, Python {env.get('python')}"
    )
    L.append(f"- Date (UTC): {env.get('date_utc')}; git {env.get('git_head')}")
    L.append(f"- Command: `{env.get('command')}`")
    L.append(
        f"- bf16 dense peak for MFU: {_f(env.get('bf16_peak_tflops'), '.0f')} TFLOP/s "
        f"({env.get('bf16_peak_source')}); "
        f"model: {_f(env.get('train_gflop_per_image'))} GFLOP/image (fwd+bwd = 3 x fwd), "
        f"{_f(env.get('run_50ep_pflop'))} PFLOP per 50-epoch run, floor at peak "
        f"{_f(env.get('run_50ep_floor_s_at_peak'), '.1f')} s"
    )
    L.append(
        f"- Precision defaults: cudnn.allow_tf32={env.get('cudnn_allow_tf32')}, "
        f"matmul.allow_tf32={env.get('matmul_allow_tf32')}, "
        f"cudnn.benchmark={env.get('cudnn_benchmark')}"
    )
    if env.get("quick"):
        L.append("- **QUICK MODE**: tiny sizes, figures are smoke-test values only")
    if env.get("forbidden_modules_loaded"):
        L.append(f"- WARNING: training imports loaded {env['forbidden_modules_loaded']}")
    if env.get("import_errors"):
        L.append(f"- Import errors: {env['import_errors']}")
    L.append("")
    L.append("| section | status | seconds |")
    L.append("|---|---|---|")
    for name, _, _ in SECTIONS:
        r = S.get(name, {})
        st = r.get("status", "not run")
        if st == "error":
            st = f"error: {r.get('error', '')[:100]}"
        elif st == "skipped":
            st = f"skipped: {r.get('reason', '')}"
        L.append(f"| {name} | {st} | {_f(r.get('seconds'), '.0f')} |")
    L.append("")

    tp = S.get("throughput", {})
    if tp:
        L += [
            f"## Training throughput (synthetic CIFAR-shaped data, batch {env.get('batch')}, "
            "ResNet-18)",
            "",
        ]
        L.append(
            "| path | ms/step | img/s | s per 50-epoch run (training only) | TFLOP/s | MFU | "
            "first step s | peak mem GB |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        labels = {
            "fp32_eager": "fp32, eager",
            "fast_eager": "channels_last + bf16, eager",
            "fast_compiled": "channels_last + bf16 + torch.compile (the fast path)",
            "proposed_fast_cudnn_benchmark": "PROPOSED: fast path + cudnn.benchmark=True",
        }
        for k, lab in labels.items():
            m = tp.get(k)
            if not m:
                continue
            if "step_ms" not in m:
                L.append(f"| {lab} | {m.get('error') or m.get('skipped')} | | | | | | |")
                continue
            L.append(
                f"| {lab} | {_f(m['step_ms'])} | {_f(m['img_s'], ',.0f')} | "
                f"{_f(m['run_50ep_train_s'], ',.0f')} | "
                f"{_f(m.get('achieved_tflops'), '.1f')} | {_f(m.get('mfu_pct'), '.1f')}% | "
                f"{_f(m.get('first_step_s'), '.1f')} | "
                f"{_f(m.get('peak_mem_gb'))} |"
            )
        L.append("")
        L.append(
            f"Speed-up of the fast path over fp32: x{_f(tp.get('speedup_fast_vs_fp32'))}. "
            f"50 epochs x {SPE_FULL} steps = {RUN_STEPS:,} steps; steady state after warm-up, "
            "timed with "
            "torch.cuda.synchronize."
        )
        L.append("")

    mo = S.get("monitors", {})
    if mo:
        L += ["## Monitors (fast-path model)", ""]
        L.append("| monitor | variant | first call s | steady s | x per run | note |")
        L.append("|---|---|---|---|---|---|")
        for k, v in mo.get("validation", {}).items():
            note = ""
            if "val_loss_abs_diff_vs_as_implemented" in v:
                note = (
                    f"val loss diff {v['val_loss_abs_diff_vs_as_implemented']:.1e}, "
                    f"acc diff {v['val_acc_abs_diff_vs_as_implemented']:.1e}"
                )
            L.append(
                f"| validation ({mo.get('n_test')} images) | {k} | {_f(v.get('first_call_s'))} | "
                f"{_f(v.get('seconds'), '.3f', v.get('error') or v.get('skipped') or 'n/a')} | "
                f"{N_VAL} | {note} |"
            )
        for k, v in mo.get("hessian", {}).items():
            note = ""
            if "lambda_rel_diff_vs_fp32" in v:
                note = (
                    f"rel diff vs fp32: lambda {v['lambda_rel_diff_vs_fp32']:.1e}, "
                    f"trace {v['trace_rel_diff_vs_fp32']:.1e}"
                )
            L.append(
                f"| Hessian lambda_max + trace | {k} | {_f(v.get('first_call_s'))} | "
                f"{_f(v.get('seconds'), '.3f', v.get('error') or v.get('skipped') or 'n/a')} | "
                f"{N_HESS} | {note} |"
            )
        gn = mo.get("grad_noise", {})
        L.append(
            f"| gradient noise | as_implemented | {_f(gn.get('first_call_s'))} | "
            f"{_f(gn.get('seconds'), '.3f', gn.get('error', 'n/a'))} | {N_NOISE} | |"
        )
        ck = mo.get("checkpoint", {})
        L.append(
            "| checkpoint latest.pt (not a monitor) | as_implemented | "
            f"{_f(ck.get('first_call_s'))} | "
            f"{_f(ck.get('seconds'), '.3f', ck.get('error', 'n/a'))} | {N_VAL} | "
            f"{_f((ck.get('bytes') or 0) / 1e6, '.0f')} MB |"
        )
        L.append("")
        o = mo.get("overhead", {})
        if "as_implemented" in o:
            L.append(
                "Overhead for a 50-epoch run, in % of the fast path's training time "
                f"({_f(o['train_s_fast_path'], ',.0f')} s):"
            )
            L.append("")
            L.append("| | validation | Hessian | gradient noise | total | within 15% |")
            L.append("|---|---|---|---|---|---|")
            for lab, key in (("as implemented", "as_implemented"), ("PROPOSED", "proposed")):
                x = o[key]
                L.append(
                    f"| {lab} | {_f(x['validation_pct'], '.1f')}% | {_f(x['hessian_pct'], '.1f')}% "
                    "| "
                    f"{_f(x['grad_noise_pct'], '.1f')}% | **{_f(x['total_pct'], '.1f')}%** "
                    f"({_f(x['total_s'], ',.0f')} s) | "
                    f"{x['within_15pct_budget']} |"
                )
            p = o["proposed"]
            L.append("")
            L.append(
                f"Proposed = validation `{p.get('validation_variant')}`, Hessian "
                f"`{p.get('hessian_variant')}`. "
                "Checkpoint writes (latest.pt at every validation point) add "
                f"{_f(o.get('checkpoint_latest_pct'), '.1f')}%."
            )
        elif o.get("error"):
            L.append(f"Overhead: {o['error']}")
        L.append("")

    me = S.get("memory", {})
    if me.get("per_variant"):
        L += [f"## GPU memory per variant (batch {env.get('batch')})", ""]
        L.append("| variant / path | train step peak GB | Hessian probe peak GB | params (M) |")
        L.append("|---|---|---|---|")
        for k, v in me["per_variant"].items():
            if "error" in v or "skipped" in v:
                L.append(f"| {k} | {v.get('error') or v.get('skipped')} | | |")
                continue
            L.append(
                f"| {k} | {_f(v['train_step_peak_gb'])} | {_f(v['hessian_peak_gb'])} | "
                f"{_f(v['params_m'])} |"
            )
        if "base_fast_compiled_train_peak_gb" in me:
            L.append(f"| base/fast_compiled | {_f(me['base_fast_compiled_train_peak_gb'])} | | |")
        L.append("")
        if me.get("note"):
            L.append(me["note"])
        if "max_process_estimate_gb" in me:
            L.append(
                f"Largest process estimate: {_f(me['max_process_estimate_gb'])} GB "
                f"(peak {_f(me['max_peak_gb'])} + dataset {_f(me['dataset_on_device_gb'])} + ~0.5 "
                "context); "
                f"within the plan's 6 GB: {me['within_plan_6gb']}."
            )
        L.append("")

    pr = S.get("profiler", {})
    if pr.get("top10"):
        L += [f"## Profiler: {pr.get('what')} ({pr.get('steps')} steps, {pr.get('path')})", ""]
        L.append(
            f"Wall {_f(pr.get('wall_ms_per_step'))} ms/step under the profiler; kernels "
            f"{_f(pr.get('kernel_ms_per_step'))} ms/step (GPU busy "
            f"~{_f(100 * pr.get('kernel_busy_fraction', 0), '.0f')}%); "
            f"{_f(pr.get('kernel_launches_per_step'), '.0f')} launches/step."
        )
        L.append("")
        L.append("| # | kernel | calls | self ms/step | % |")
        L.append("|---|---|---|---|---|")
        for i, r in enumerate(pr["top10"], 1):
            name = r["name"].replace("|", "/")[:110]
            L.append(
                f"| {i} | `{name}` | {r['calls']} | {_f(r['self_ms_per_step'], '.3f')} | "
                f"{_f(r['pct'], '.1f')} |"
            )
        L.append("")
        L.append(
            "By kind: " + ", ".join(f"{k} {v:.1f}%" for k, v in pr.get("by_kind_pct", {}).items())
        )
        L.append("")
        if pr.get("table"):
            L += [
                "<details><summary>profiler table</summary>",
                "",
                "```",
                pr["table"],
                "```",
                "",
                "</details>",
                "",
            ]

    co = S.get("correctness", {})
    if co.get("train_loss"):
        tl = co["train_loss"]
        L += ["## Correctness: fast path vs fp32 (same seed, same data, real train())", ""]
        L.append(f"Config: {co.get('config')}; train() seconds: {co.get('train_seconds')}")
        L.append("")
        L.append(
            f"- Train loss, first {tl['steps_compared']} steps: step-1 |diff| "
            f"{tl['step1_abs_diff']:.2e}; "
            f"per step max |diff| {tl['max_abs_diff']:.4f} nats (mean {tl['mean_abs_diff']:.4f}, "
            f"max rel {tl['max_rel_diff']:.3%}); "
            f"{tl['window']}-step window means max |diff| {_f(tl['window_max_abs_diff'], '.4f')}; "
            f"smoothed ({tl['smoothing']}) max |diff| {tl['smoothed_max_abs_diff']:.4f} (rel "
            f"{tl['smoothed_max_rel_diff']:.3%}). "
            f"Tolerance: {tl['tolerance']} -> **{'PASS' if tl['pass'] else 'FAIL'}**"
        )
        L.append(
            f"  - window means fp32 {[round(x, 4) for x in tl['window_means_fp32']]}, fast "
            f"{[round(x, 4) for x in tl['window_means_fast']]}"
        )
        hs = co.get("hessian_same_weights", {})
        if hs:
            L.append(
                f"- Hessian on the same weights (fp32 run, step {hs.get('at_step')}), same probes; "
                f"{hs.get('tolerance')}:"
            )
            for k in ("fp32", "fast_path_as_implemented", "bf16_autocast"):
                v = hs.get(k, {})
                extra = ""
                if "lambda_rel_diff" in v:
                    extra = (
                        f" (rel diff lambda {v['lambda_rel_diff']:.2e}, trace "
                        f"{v['trace_rel_diff']:.2e}) -> {'PASS' if v['pass'] else 'FAIL'}"
                    )
                L.append(
                    f"  - {k}: lambda_max {_f(v.get('lambda_max'), '.5g')}, trace "
                    f"{_f(v.get('trace'), '.5g')}{extra}"
                )
        if co.get("hessian_in_run"):
            L.append(
                "- In-run Hessian (informational, not judged: each run measures its own weights, "
                "which drift apart over the steps, and Hutchinson estimates with few probes are "
                "noisy):"
            )
        for e in co.get("hessian_in_run", []):
            L.append(
                f"  - step {e['step']}: lambda_max fp32 {e['lambda_fp32']:.5g} vs fast "
                f"{e['lambda_fast']:.5g} (rel {e['lambda_rel_diff']:.2e}); trace "
                f"{e['trace_fp32']:.5g} vs {e['trace_fast']:.5g} (rel {e['trace_rel_diff']:.2e}); "
                f"finite {e['finite']}"
            )
        if co.get("val_loss_last"):
            L.append(f"- Last val loss: {co['val_loss_last']}")
        L.append(
            f"- Hessian verdict (fast path on the same weights within {HESS_TOL_REL:.0%}, all "
            f"values finite): **{'PASS' if co.get('hessian_pass') else 'FAIL'}**"
        )
        L.append("")

    sh = S.get("sharing", {})
    if sh.get("solo_img_s"):
        L += ["## Two runs sharing one GPU", ""]
        L.append(
            f"Fast path ({sh.get('path')}), two processes, {sh.get('measure_seconds')} s windows: "
            "one alone "
            f"**{sh['solo_img_s']:,.0f} img/s**; both at once {sh['pair'][0]['img_s']:,.0f} + "
            f"{sh['pair'][1]['img_s']:,.0f} = "
            f"**{sh['pair_aggregate_img_s']:,.0f} img/s** -> aggregate "
            f"**x{sh['aggregate_ratio_2_vs_1']:.2f}** "
            f"(each run x{sh['per_run_slowdown']:.2f} slower). Process memory (max reserved): "
            f"{[p.get('max_reserved_gb') for p in sh['pair']]} GB."
        )
        L.append("")
        L.append(
            f"Start-up of a training process (two at once: interpreter, torch import, data, "
            f"{'torch.compile from the warm cache, ' if 'compile' in sh.get('path', '') else ''}"
            f"{ctx_warm_steps(R)} warm-up steps): "
            f"{_f(sh.get('workers_ready_s'), '.1f')} s."
        )
        L.append("")

    rs = S.get("resume", {})
    if rs.get("verdict"):
        L += ["## Resume after a crash (real train())", ""]
        L.append(f"Config: {rs.get('config')}")
        L.append("")
        c = rs.get("resumed_vs_uninterrupted", {})
        L.append(
            f"- Crash: `{rs.get('crash')}`; rows kept to step {rs.get('rows_after_crash')}; "
            "resumed run attempts "
            f"{rs.get('resumed_attempts')}, outcome {rs.get('resumed_outcome')}"
        )
        for fam in ("batch_metrics", "val_metrics", "curvature_metrics", "noise_metrics"):
            v = c.get(fam, {})
            cols = {k: x for k, x in v.items() if isinstance(x, dict)}
            L.append(
                f"- {fam}: rows {v.get('rows')}, same steps {v.get('same_steps')}; "
                + ", ".join(
                    f"{k} exact={x['exact']} max|d|={x['max_abs_diff']:.2e}"
                    for k, x in cols.items()
                )
            )
        L.append(
            f"- Uninterrupted vs uninterrupted (nondeterminism floor): max |d| train loss "
            f"{_f(rs.get('nondeterminism_floor_loss_max_abs_diff'), '.2e')}"
        )
        L.append(f"- Tolerance: {rs.get('tolerance')} -> **{rs['verdict']}**")
        L.append("")

    e2 = S.get("e2e", {})
    if e2.get("epoch_s"):
        L += ["## End to end: real train() with every monitor", ""]
        L.append(f"Config: {e2.get('config')}")
        L.append("")
        L.append(
            f"- Epoch times: {[round(x, 2) for x in e2['epoch_s']]} s (first includes data, "
            "compile, first validation)"
        )
        if "steady_epoch_s" in e2:
            L.append(
                f"- Steady epoch {e2['steady_epoch_s']:.2f} s; corrected to the average monitor "
                "rate "
                f"{e2['steady_epoch_s_rate_corrected']:.2f} s ({e2['window_monitor_counts']}); "
                "training alone "
                f"{_f(e2.get('train_only_epoch_s'))} s -> loop + monitors + checkpoints add "
                f"{_f(e2.get('loop_overhead_pct'), '.0f')}%"
            )
            L.append(
                f"- **50-epoch run with monitors: {e2['run_50ep_s']:.0f} s** (first epoch + 49 "
                "steady); "
                f"{e2['run_50ep_s_amortized_no_startup']:.0f} s amortized without startup. Goal <= "
                "60 s: "
                f"{e2['goal_60s']}; moonshot <= 40 s: {e2['moonshot_40s']}"
            )
        L.append(
            f"- Peak memory of the run (allocated, incl. its dataset): {_f(e2.get('peak_mem_gb'))} "
            "GB"
        )
        L.append("")

    cg = S.get("cudagraphs", {})
    m = cg.get("fast_compiled_reduce_overhead")
    if m:
        L += ["## PROPOSED: CUDA graphs (torch.compile mode='reduce-overhead')", ""]
        L.append(
            f"{_f(m['step_ms'])} ms/step, {_f(m['img_s'], ',.0f')} img/s, 50-epoch training "
            f"{_f(m['run_50ep_train_s'], ',.0f')} s, "
            f"MFU {_f(m.get('mfu_pct'), '.1f')}%; "
            f"x{_f(cg.get('speedup_vs_fast_compiled_default'))} vs default compile; "
            f"first step {_f(m['first_step_s'], '.1f')} s"
        )
        L.append("")
    errs = {k: v.get("error") for k, v in S.items() if v.get("status") == "error"}
    if errs:
        L += ["## Errors", ""] + [f"- {k}: `{v}`" for k, v in errs.items()] + [""]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section")
    p.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="seconds; sections that would start later are skipped",
    )
    p.add_argument("--sections", default="", help="comma-separated subset (env always runs)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--no-compile", action="store_true", help="never torch.compile")
    p.add_argument(
        "--cpu-compile", action="store_true", help="allow torch.compile on CPU (bench steps only)"
    )
    p.add_argument(
        "--width-mult",
        type=float,
        default=None,
        help="model width (default 1; 0.125 with --quick on CPU)",
    )
    p.add_argument("--fail-section", default="", help=argparse.SUPPRESS)  # robustness test
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.width_mult is None:
        a.width_mult = 0.125 if (a.quick and not a.device.startswith("cuda")) else 1.0
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # This process compiles several model instances and modes (train, eval, proposed
    # variants); a training run compiles one model. Keep dynamo from falling back to eager.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    # `timeout` sends SIGTERM: leave through the finally blocks (figures saved, workers ended).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.worker:
        return worker_main(args)
    ctx = Ctx(args)
    only = {x.strip() for x in args.sections.split(",") if x.strip()}
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    log(
        f"gpu_check: device {ctx.device}, out {ctx.out}, budget {args.budget:.0f} s, quick "
        f"{args.quick}"
    )
    try:
        for name, fn, min_s in SECTIONS:
            rec = ctx.R["sections"].setdefault(name, {})
            if name != "env" and ((only and name not in only) or name in skip):
                rec.update(status="skipped", reason="not selected")
                continue
            if ctx.left() < min_s:
                rec.update(
                    status="skipped",
                    reason=f"out of time budget ({ctx.left():.0f} s left, needs ~{min_s} s)",
                )
                log(f"== {name}: skipped, {ctx.left():.0f} s left")
                ctx.save()
                continue
            log(f"== {name} ({ctx.left():.0f} s of budget left)")
            t = time.monotonic()
            try:
                if name == args.fail_section:
                    raise RuntimeError(f"--fail-section {name}: injected failure")
                fn(ctx, rec)
                rec["status"] = "ok"
            except Exception as e:
                rec["status"] = "error"
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                rec["traceback"] = traceback.format_exc()[-4000:]
                log(f"== {name}: ERROR {rec['error'][:300]}")
                print(rec["traceback"], flush=True)
                if name == "env" and ctx.data is None:
                    ctx.load_data()  # the other sections need the data at least
            rec["seconds"] = time.monotonic() - t
            try:
                free(ctx)
            except Exception as e:  # a broken CUDA context: record and go on
                rec["cleanup_error"] = f"{type(e).__name__}: {e}"
            ctx.R["meta"]["elapsed_s"] = time.monotonic() - T0
            ctx.save()
            log(f"== {name}: {rec['status']} in {rec['seconds']:.1f} s")
    finally:
        for rec in ctx.R["sections"].values():
            rec.setdefault("status", "interrupted (time limit or signal)")
        ctx.R["meta"]["elapsed_s"] = time.monotonic() - T0
        ctx.save()
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    log(
        f"done in {time.monotonic() - T0:.0f} s: {ctx.out / 'gpu_figures.json'}, "
        f"{ctx.out / 'gpu_figures.md'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
