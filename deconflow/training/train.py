"""Train one cell of the sweep: one obvious loop, every monitor of SPEC section 3.

Data order, augmentation and probes are drawn from generators seeded by (seed, step),
and metrics are written with the checkpoint, so a run that is killed and started again
resumes from ``latest.pt`` and produces exactly the rows an uninterrupted run would.
Per-step metrics stay on the device and are copied to the host once per validation
point (every 0.25 epoch), so the GPU never waits for the host inside that window.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deconflow import settings
from deconflow.atomic import atomic_write_json
from deconflow.profiles import TrainConfig, variant_spec
from deconflow.protocol import (
    CHECKPOINT_DIR,
    COMPLETED,
    DIVERGED,
    HEARTBEAT,
    SUMMARY,
)
from deconflow.schedule import Schedule, lr_at
from deconflow.sweep import Cell
from deconflow.training import monitors, optim
from deconflow.training.augment import normalize, random_resized_crop_flip, to_float
from deconflow.training.checkpoints import (
    CheckpointError,
    CheckpointMismatch,
    Checkpoints,
    disk_full_is_one_line,
)
from deconflow.training.data import load_dataset
from deconflow.training.metrics_io import MetricLog
from deconflow.training.model import build_model
from deconflow.training.summary import summarize

LN2 = math.log(2.0)
# Fields of the config that may change between attempts of one run without changing
# its science (out-of-memory retries raise grad_accum; a resume may land on other hardware).
RESUME_FREE_FIELDS = {"grad_accum", "device", "heartbeat_every_s", "fault", "compile", "extra"}
# Analysis windows are read by the analysis only, never by training.
RESUME_FREE_FIELDS |= {"alpha_early_epochs", "knee_epochs", "compile_mode", "checkpoint_every"}


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash())."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(*parts))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fingerprint(cell: Cell, cfg: TrainConfig) -> dict:
    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_FIELDS}
    return {"cell": cell.key, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


def fault_plan(cfg: TrainConfig) -> dict[int, list[str]]:
    """Fault injection for reliability tests: ``kind@step`` in cfg.fault or DECONFLOW_FAULT,
    parsed once at start into step -> kinds (the step loop only looks its step up)."""
    spec = cfg.fault or settings.get("DECONFLOW_FAULT") or ""
    plan: dict[int, list[str]] = {}
    for item in filter(None, spec.split(",")):
        kind, _, at = item.partition("@")
        if at:
            plan.setdefault(int(at), []).append(kind)
    return plan


def _inject_fault(cfg: TrainConfig, step: int, plan: dict[int, list[str]]) -> str | None:
    for kind in plan.get(step, ()):
        if kind == "oom" and cfg.grad_accum == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by DECONFLOW_FAULT)")
        if kind == "crash":
            raise RuntimeError(f"injected crash at step {step}")
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "nan":
            return "nan"
    return None


def build_optimizer(cell: Cell, optimizer: str, params: list) -> optim.SGD | optim.AdamW:
    if optimizer == "adamw":
        return optim.AdamW(params, lr=cell.lr, betas=(0.9, 0.999), weight_decay=cell.weight_decay)
    return optim.SGD(params, lr=cell.lr, momentum=0.9, weight_decay=cell.weight_decay)


class BatchOrder:
    """Batch ``step + 1`` of the run: a per-epoch permutation, then batched augmentation.

    The permutation is drawn once per epoch from the CPU generator seeded by (seed, epoch)
    and copied to the device in one transfer. The augmentation draws come from one device
    generator made once per run and re-seeded per step with the precomputed (seed, step)
    seed: a host-side seed set (no allocation, no synchronisation) that keeps the exact
    random stream, hence the per-step losses, of a fresh generator per step, and makes any
    step reproducible on its own (resume).
    """

    def __init__(self, data, cfg: TrainConfig, cell: Cell, sched: Schedule, device) -> None:
        self.data, self.cfg, self.cell, self.sched, self.device = data, cfg, cell, sched, device
        self.mean, self.std = data.mean.to(device), data.std.to(device)
        self.perm, self.perm_epoch = None, -1
        self.aug_gen = torch.Generator(device=device)
        self.aug_seeds = [_seed(cell.seed, s, 1) for s in range(sched.total_steps + 1)]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch = step // self.sched.steps_per_epoch
        if self.perm_epoch != epoch:
            perm = torch.randperm(
                len(self.data.y_train),
                generator=_generator(torch.device("cpu"), self.cell.seed, epoch),
            )
            self.perm, self.perm_epoch = perm.to(self.device), epoch
        i0 = (step % self.sched.steps_per_epoch) * self.sched.batch
        idx = self.perm[i0 : i0 + self.sched.batch]
        x = random_resized_crop_flip(
            self.data.x_train[idx],
            self.aug_gen.manual_seed(self.aug_seeds[step]),
            self.cfg.crop_scale,
            self.cfg.crop_ratio,
        )
        x, y = normalize(x, self.mean, self.std), self.data.y_train[idx]
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def normalized(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return normalize(to_float(x_uint8), self.mean, self.std)


def forward_backward(fwd, x, y, sched: Schedule, grad_accum: int, amp, fault: str | None):
    """Accumulate the gradient of one step; returns (mean loss, correct) as device tensors."""
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    m = sched.micro
    for k in range(grad_accum):
        xb, yb = x[k * m : (k + 1) * m], y[k * m : (k + 1) * m]
        with amp:
            logits = fwd(xb)
            loss = nn.functional.cross_entropy(logits.float(), yb)
        if fault == "nan":
            loss = loss * float("nan")
        (loss / grad_accum).backward()
        loss_sum += loss.detach() * (len(yb) / sched.batch)
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum, correct


def clip_or_measure_grad_norm(params, clip: float | None, needed: bool):
    """Clip (bn_off) and return the norm; else measure it only when it is logged."""
    if clip is not None:
        return nn.utils.clip_grad_norm_(params, clip)
    if needed:
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])
        )
    return None


# Inference keeps no activations, so big batches fill the GPU; 2000 divides the 10k test
# set (one shape: no recompile for a ragged last chunk).
VAL_CHUNK = 2000


@torch.inference_mode()
def validate(model, fwd, x_test, y_test, amp, chunk: int = VAL_CHUNK):
    """(summed loss, correct) over the test set, as device tensors (no host sync)."""
    model.eval()
    vloss = torch.zeros((), device=x_test.device)
    vcorrect = torch.zeros((), device=x_test.device)
    with amp:
        for j in range(0, len(x_test), chunk):
            logits = fwd(x_test[j : j + chunk]).float()
            vloss += nn.functional.cross_entropy(logits, y_test[j : j + chunk], reduction="sum")
            vcorrect += (logits.argmax(1) == y_test[j : j + chunk]).sum()
    model.train()
    return vloss, vcorrect


class StepMetrics:
    """Per-step loss and accuracy kept on the device; read back once per validation point,
    together with that point's validation numbers (one transfer)."""

    def __init__(self, cell: Cell, sched: Schedule, device, start_step: int) -> None:
        self.cell, self.sched = cell, sched
        self.loss = torch.zeros(sched.total_steps + 1, device=device)
        self.correct = torch.zeros(sched.total_steps + 1, device=device)
        self.flushed_upto = start_step
        self.diverged_at: int | None = None
        self.lrs = [
            lr_at(s, cell.lr, sched.warmup_steps, sched.total_steps)
            for s in range(sched.total_steps + 1)
        ]

    def record(self, step: int, loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.loss[step] = loss
        self.correct[step] = correct

    def fetch(self, upto: int, extra: list[torch.Tensor] | None = None):
        """(losses, correct, extra values) of steps after the last flush up to ``upto``, read
        back in one transfer; ``extra`` are 0-d device tensors read along with them."""
        a = self.flushed_upto
        n = max(0, upto - a)
        parts = [self.loss[a + 1 : a + 1 + n], self.correct[a + 1 : a + 1 + n]]
        if extra:
            parts.append(torch.stack([t.float().reshape(()) for t in extra]))
        host = torch.cat(parts).cpu().numpy().astype(float)
        return host[:n], host[n : 2 * n], host[2 * n :].tolist()

    def flush(self, upto: int, metrics: MetricLog, fetched=None) -> None:
        """Append steps up to ``upto`` as batch rows; stop at a non-finite loss."""
        if upto <= self.flushed_upto:
            return
        a, sched, cell = self.flushed_upto, self.sched, self.cell
        losses, correct, _ = fetched if fetched is not None else self.fetch(upto)
        steps = np.arange(a + 1, upto + 1)
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            cut = bad[0] + 1  # keep the first non-finite row: it is the divergence point
            losses, correct, steps = losses[:cut], correct[:cut], steps[:cut]
            self.diverged_at = int(steps[-1])
        metrics.extend(
            "batch_metrics",
            {
                "step": steps.tolist(),
                "epoch": (steps / sched.steps_per_epoch).tolist(),
                "loss_nats": losses.tolist(),
                "loss_bits": (losses / LN2).tolist(),
                "accuracy": (correct / sched.batch).tolist(),
                "lr": [self.lrs[s] for s in steps],
                "weight_decay": [cell.weight_decay] * len(steps),
            },
        )
        self.flushed_upto = upto


class Heartbeat:
    """``heartbeat.json``: the watchdog's evidence of progress, rewritten every few seconds."""

    def __init__(self, path: Path, every_s: float, sched: Schedule) -> None:
        self.path, self.every_s, self.sched, self.last = path, every_s, sched, 0.0

    def beat(self, step: int, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= self.every_s:
            with disk_full_is_one_line(self.path):
                self._write(step, now)
            self.last = now

    def _write(self, step: int, now: float) -> None:
        atomic_write_json(
            self.path,
            {
                "step": step,
                "epoch": self.sched.epoch(step),
                "time": now,
                "pid": os.getpid(),
                "total_steps": self.sched.total_steps,
            },
        )


def resume_or_start(ckpts, metrics, model, opt, fingerprint, out: Path, device, log=None):
    """(step, wall time before, attempt) from the newest intact checkpoint (``latest.pt``,
    else ``latest.prev.pt``), or a fresh start at step 0 when there is none. A corrupt
    checkpoint is set aside and logged; one of another config is a config error."""
    if log is not None:
        ckpts.log = log
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def check(state: dict) -> None:
        if state["fingerprint"] != fingerprint:
            raise CheckpointMismatch(
                f"checkpoint in {out} belongs to another config (cell, profile or sizes); "
                f"remove {out} or train into another folder"
            )
        if {k: tuple(v.shape) for k, v in state["model"].items()} != shapes:
            raise ValueError("its model weights do not fit the model")
        if len(state["optimizer"]["param_groups"]) != len(opt.param_groups):
            raise ValueError("its optimizer state does not fit the optimizer")

    state = ckpts.load_resumable(map_location=device, check=check)
    if state is None:
        metrics.clear()
        ckpts.prune_after(0)  # best checkpoints of an attempt whose resume state was lost
        return 0, 0.0, 1
    step = state["step"]
    try:
        opt.load_state_dict(state["optimizer"])
        model.load_state_dict(state["model"])
        metrics.load(upto_step=step)
    except Exception as e:  # loaded but unusable: retried from scratch by the watchdog
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(
            f"corrupt checkpoint {state['_source']} (step {step}) or metrics in {out}: {why}"
        ) from None
    ckpts.prune_after(step)
    return step, state["wall_time_s"], state["attempts"] + 1


def train(
    cell: Cell,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    log: Callable[[str], None] = print,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) one cell to the end; returns the ``summary.json`` contents."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    device = pick_device(cfg.device)
    spec = variant_spec(cell)
    data = load_dataset(cfg).to(device)
    sched = Schedule.of(cfg, len(data.y_train))
    total = sched.total_steps

    torch.manual_seed(cell.seed)
    width = cfg.width_mult * spec.width_factor
    model = build_model(data.num_classes, data.x_train.shape[1], width, spec.norm).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cell, spec.optimizer, params)
    compiled = cfg.compile and device.type == "cuda"
    fwd = torch.compile(model, mode=cfg.compile_mode) if compiled else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    batches = BatchOrder(data, cfg, cell, sched, device)
    x_test = batches.normalized(data.x_test)
    if cfg.channels_last:
        x_test = x_test.contiguous(memory_format=torch.channels_last)
    hess_x = batches.normalized(data.x_train[: cfg.hessian_batch])
    hess_y = data.y_train[: cfg.hessian_batch]

    ckpts = Checkpoints(out / CHECKPOINT_DIR, cfg.keep_best)
    metrics = MetricLog(out, cell.key)
    fingerprint = _fingerprint(cell, cfg)
    step, wall_before, attempts = resume_or_start(
        ckpts, metrics, model, opt, fingerprint, out, device, log=log
    )
    if step:
        log(f"resumed {cell.key} from step {step}/{total} (attempt {attempts})")
    else:
        log(f"training {cell.key} on {device}: {total} steps, profile {cfg.profile}")
    heartbeat = Heartbeat(out / HEARTBEAT, cfg.heartbeat_every_s, sched)
    steps = StepMetrics(cell, sched, device, step)
    n_val = len(metrics.rows["val_metrics"])
    heartbeat.beat(step, force=True)

    faults = fault_plan(cfg)  # parsed once: the step only looks its number up
    lrs = steps.lrs
    model.train()
    while step < total and steps.diverged_at is None:
        # ---- one optimisation step: batch `step + 1` of the run ----
        x, y = batches.batch(step)
        lr = lrs[step + 1]  # a host float: eager SGD/AdamW would .item() a tensor lr
        for g in opt.param_groups:
            g["lr"] = lr
        fault = _inject_fault(cfg, step + 1, faults) if faults else None
        # Zeroed in place, not freed: the gradient buffers keep their addresses (and the
        # allocator its blocks); backward then adds into zeros, which is exact.
        opt.zero_grad(set_to_none=False)
        loss, correct = forward_backward(fwd, x, y, sched, cfg.grad_accum, amp, fault)
        step += 1
        is_val = step in sched.val_steps
        grad_norm = clip_or_measure_grad_norm(params, spec.clip_grad_norm, is_val)
        opt.step()
        steps.record(step, loss, correct)
        heartbeat.beat(step)

        # ---- curvature every `hessian_every` steps (one read-back per measurement) ----
        if cfg.hessian_every and step % cfg.hessian_every == 0:
            gen = _generator(device, cell.seed, step, 2)
            lam, tr = monitors.curvature(
                model, hess_x, hess_y, cfg.hessian_iters, cfg.hutchinson_samples, gen, amp
            )
            metrics.add(
                "curvature_metrics",
                step=step,
                epoch=sched.epoch(step),
                lambda_max=lam,
                hessian_trace=tr,
            )
        if not is_val:
            continue

        # ---- validation point (every 0.25 epoch): evaluate, one read-back, checkpoint ----
        # Eager forward: a compiled eval-mode graph costs a second compile in every run.
        vloss, vcorrect = validate(model, model, x_test, data.y_test, amp)
        weight_norm = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in params]))
        n_test = len(x_test)
        fetched = steps.fetch(step, [vloss / n_test, vcorrect / n_test, grad_norm, weight_norm])
        steps.flush(step, metrics, fetched)
        if steps.diverged_at is not None:
            break
        v = fetched[2]
        metrics.add(
            "val_metrics",
            step=step,
            epoch=sched.epoch(step),
            val_loss=v[0],
            val_accuracy=v[1],
            grad_norm=v[2],
            weight_norm=v[3],
        )
        if sched.noise_every and step % sched.noise_every == 0:
            metrics.add("noise_metrics", **measure_noise(model, batches, metrics, step, cfg))
        ckpts.offer_best(v[0], step, model.state_dict())
        n_val += 1
        if n_val % cfg.checkpoint_every and step != total:
            continue
        metrics.flush()
        ckpts.write_best()
        ckpts.save_latest(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "wall_time_s": wall_before + time.monotonic() - t_start,
                "attempts": attempts,
                "fingerprint": fingerprint,
            }
        )
        heartbeat.beat(step, force=True)
        report(step, sched, cfg, metrics, v, log, progress)

    steps.flush(step, metrics)
    diverged_at = steps.diverged_at
    metrics.truncate_after(diverged_at if diverged_at is not None else step)
    metrics.compact()  # one file per family, as published
    ckpts.write_best()
    heartbeat.beat(step, force=True)
    if diverged_at is not None:
        log(f"nan loss: run diverged at step {diverged_at}; metrics up to it are kept")
    outcome = DIVERGED if diverged_at is not None else COMPLETED
    summary = summarize(cell, cfg, metrics, outcome, sched.steps_per_epoch, total)
    summary.update(
        wall_time_s=wall_before + time.monotonic() - t_start,
        attempts=attempts,
        device=str(device),
        grad_accum=cfg.grad_accum,
        diverged_at_step=diverged_at,
        n_params=sum(p.numel() for p in params),
    )
    atomic_write_json(out / SUMMARY, summary)
    return summary


def measure_noise(model, batches: BatchOrder, metrics: MetricLog, step: int, cfg) -> dict:
    """Gradient noise at a validation point: micro-batch gradients and the loss signal."""
    sched, data = batches.sched, batches.data
    g = _generator(torch.device("cpu"), batches.cell.seed, step, 3)
    picks = torch.randint(0, len(data.y_train), (cfg.noise_microbatches, sched.micro), generator=g)
    picks = picks.to(batches.device)
    xs = [batches.normalized(data.x_train[p]) for p in picks]
    ys = [data.y_train[p] for p in picks]
    recent = metrics.rows["batch_metrics"][-sched.noise_every :]
    signal = np.array([r["loss_nats"] for r in recent])
    tail, var, resid = monitors.grad_noise(model, xs, ys, signal)
    return {
        "step": step,
        "epoch": sched.epoch(step),
        "psd_tail_ratio": tail,
        "grad_variance": var,
        "residual_power": resid,
    }


def report(step, sched: Schedule, cfg, metrics: MetricLog, v: list, log, progress) -> None:
    """Progress to the caller (Pipes) at each checkpoint; a log line once per epoch."""
    info = {
        "step": step,
        "total_steps": sched.total_steps,
        "epoch": sched.epoch(step),
        "train_loss": metrics.rows["batch_metrics"][-1]["loss_nats"],
        "val_loss": v[0],
        "val_accuracy": v[1],
    }
    if progress:
        progress(info)
    if step % sched.steps_per_epoch == 0:
        log(
            f"epoch {step // sched.steps_per_epoch}/{cfg.epochs}: train loss "
            f"{info['train_loss']:.4f}, val loss {v[0]:.4f}, val acc {v[1]:.3f}"
        )
