"""Shared pieces of the GPU check: sizes, the context of one run, the step harness."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.pop("DECONFLOW_FAULT", None)  # train() also reads faults from the environment

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.train_throughput import BF16_PEAK_TFLOPS, sync  # noqa: E402
from deconflow.profiles import VARIANT_SPECS, get_profile  # noqa: E402
from deconflow.training.augment import normalize, random_resized_crop_flip  # noqa: E402
from deconflow.training.data import synthetic_dataset  # noqa: E402
from deconflow.training.model import build_model  # noqa: E402

# The sections in the order they run (bench/gpu_check.py maps each to its function).
SECTION_NAMES = [
    "env",
    "throughput",
    "monitors",
    "memory",
    "profiler",
    "correctness",
    "sharing",
    "resume",
    "e2e",
    "cudagraphs",
]

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
            from bench.gpu_report import render_md  # the report module imports this one

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
