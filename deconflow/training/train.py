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

from deconflow.analysis.fits import fit_run
from deconflow.atomic import atomic_write_json
from deconflow.sweep import Cell
from deconflow.training import monitors
from deconflow.training.augment import normalize, random_resized_crop_flip, to_float
from deconflow.training.checkpoints import Checkpoints
from deconflow.training.config import TrainConfig, variant_spec
from deconflow.training.data import load_dataset
from deconflow.training.metrics_io import MetricLog
from deconflow.training.model import build_model

LN2 = math.log(2.0)
# Fields of the config that may change between attempts of one run without changing
# its science (out-of-memory retries raise grad_accum; a resume may land on other hardware).
RESUME_FREE_FIELDS = {"grad_accum", "device", "heartbeat_every_s", "fault", "compile", "extra"}


class Diverged(Exception):
    """A non-finite training loss: a result of the experiment, not a failure."""


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash())."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(*parts))


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of 1-based ``step``: linear warm-up to base_lr, then cosine to 0.

    The cosine reaches 0 at the end of the last step, so every step's lr is > 0.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps - 1) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fingerprint(cell: Cell, cfg: TrainConfig) -> dict:
    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_FIELDS}
    return {"cell": cell.key, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


def _inject_fault(cfg: TrainConfig, step: int) -> str | None:
    """Fault injection for reliability tests: ``kind@step`` in cfg.fault or DECONFLOW_FAULT."""
    spec = cfg.fault or os.environ.get("DECONFLOW_FAULT", "")
    for item in filter(None, spec.split(",")):
        kind, _, at = item.partition("@")
        if at and int(at) == step:
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
    n_train, batch = len(data.y_train), cfg.batch_size
    micro = batch // cfg.grad_accum
    steps_per_epoch = n_train // batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {batch} is larger than the training set ({n_train})")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    val_steps = {
        max(1, round(k * steps_per_epoch / cfg.val_per_epoch))
        for k in range(1, cfg.epochs * cfg.val_per_epoch + 1)
    }
    noise_every = cfg.noise_every_epochs * steps_per_epoch

    torch.manual_seed(cell.seed)
    model = build_model(
        data.num_classes, data.x_train.shape[1], cfg.width_mult * spec.width_factor, spec.norm
    ).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adamw":
        opt = torch.optim.AdamW(
            params, lr=cell.lr, betas=(0.9, 0.999), weight_decay=cell.weight_decay
        )
    else:
        opt = torch.optim.SGD(params, lr=cell.lr, momentum=0.9, weight_decay=cell.weight_decay)
    fwd = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    mean, std = data.mean.to(device), data.std.to(device)
    x_test = normalize(to_float(data.x_test), mean, std)
    hess_x = normalize(to_float(data.x_train[: cfg.hessian_batch]), mean, std)
    hess_y = data.y_train[: cfg.hessian_batch]

    ckpts = Checkpoints(out / "checkpoints", cfg.keep_best)
    metrics = MetricLog(out, cell.key)
    step, wall_before, attempts = 0, 0.0, 1
    fingerprint = _fingerprint(cell, cfg)
    state = ckpts.load_latest(map_location=device)
    if state is not None:
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"checkpoint in {out} belongs to another config; use a fresh output folder"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, wall_before, attempts = state["step"], state["wall_time_s"], state["attempts"] + 1
        metrics.load(upto_step=step)
        ckpts.prune_after(step)
        log(f"resumed {cell.key} from step {step}/{total_steps} (attempt {attempts})")
    else:
        for f in out.glob("*_metrics.parquet"):
            f.unlink()
        log(f"training {cell.key} on {device}: {total_steps} steps, profile {cfg.profile}")

    heartbeat_path, last_beat = out / "heartbeat.json", 0.0

    def beat(force: bool = False) -> None:
        nonlocal last_beat
        now = time.time()
        if force or now - last_beat >= cfg.heartbeat_every_s:
            atomic_write_json(
                heartbeat_path,
                {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "time": now,
                    "pid": os.getpid(),
                    "total_steps": total_steps,
                },
            )
            last_beat = now

    # Per-step metrics accumulate here, on the device, until the next flush.
    buf_loss = torch.zeros(total_steps + 1, device=device)
    buf_correct = torch.zeros(total_steps + 1, device=device)
    flushed_upto = step
    diverged_at: int | None = None
    perm, perm_epoch = None, -1
    n_val = len(metrics.rows["val_metrics"])
    beat(force=True)

    def flush(upto: int) -> None:
        """Copy per-step metrics to the host (one sync) and look for divergence."""
        nonlocal flushed_upto, diverged_at
        if upto <= flushed_upto:
            return
        losses = buf_loss[flushed_upto + 1 : upto + 1].cpu().numpy().astype(float)
        correct = buf_correct[flushed_upto + 1 : upto + 1].cpu().numpy().astype(float)
        steps = np.arange(flushed_upto + 1, upto + 1)
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            cut = bad[0] + 1  # keep the first non-finite row: it is the divergence point
            losses, correct, steps = losses[:cut], correct[:cut], steps[:cut]
            diverged_at = int(steps[-1])
        lrs = [lr_at(int(s), cell.lr, warmup_steps, total_steps) for s in steps]
        metrics.extend(
            "batch_metrics",
            {
                "step": steps.tolist(),
                "epoch": (steps / steps_per_epoch).tolist(),
                "loss_nats": losses.tolist(),
                "loss_bits": (losses / LN2).tolist(),
                "accuracy": (correct / batch).tolist(),
                "lr": lrs,
                "weight_decay": [cell.weight_decay] * len(steps),
            },
        )
        flushed_upto = upto

    model.train()
    while step < total_steps and diverged_at is None:
        # ---- one optimisation step: batch `step + 1` of the run ----
        epoch = step // steps_per_epoch
        if perm_epoch != epoch:
            perm = torch.randperm(
                n_train, generator=_generator(torch.device("cpu"), cell.seed, epoch)
            )
            perm, perm_epoch = perm.to(device), epoch
        i0 = (step % steps_per_epoch) * batch
        idx = perm[i0 : i0 + batch]
        x = random_resized_crop_flip(
            data.x_train[idx],
            _generator(device, cell.seed, step, 1),
            cfg.crop_scale,
            cfg.crop_ratio,
        )
        x, y = normalize(x, mean, std), data.y_train[idx]
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = lr_at(step + 1, cell.lr, warmup_steps, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        fault = _inject_fault(cfg, step + 1)
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for k in range(cfg.grad_accum):
            xb, yb = x[k * micro : (k + 1) * micro], y[k * micro : (k + 1) * micro]
            with amp:
                logits = fwd(xb)
                loss = nn.functional.cross_entropy(logits.float(), yb)
            if fault == "nan":
                loss = loss * float("nan")
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() * (len(yb) / batch)
            correct += (logits.argmax(1) == yb).sum()
        step += 1
        is_val = step in val_steps
        grad_norm = None
        if spec.clip_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, spec.clip_grad_norm)
        elif is_val:
            grad_norm = torch.linalg.vector_norm(
                torch.stack(
                    [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
                )
            )
        opt.step()
        buf_loss[step] = loss_sum
        buf_correct[step] = correct
        beat()

        # ---- slow monitors ----
        if cfg.hessian_every and step % cfg.hessian_every == 0:
            lam, tr = monitors.curvature(
                model,
                hess_x,
                hess_y,
                cfg.hessian_iters,
                cfg.hutchinson_samples,
                _generator(device, cell.seed, step, 2),
            )
            metrics.add(
                "curvature_metrics",
                step=step,
                epoch=step / steps_per_epoch,
                lambda_max=lam,
                hessian_trace=tr,
            )

        if not is_val:
            continue
        # ---- validation point (every 0.25 epoch): flush, evaluate, checkpoint ----
        flush(step)
        if diverged_at is not None:
            break
        model.eval()
        with torch.no_grad(), amp:
            vloss = torch.zeros((), device=device)
            vcorrect = torch.zeros((), device=device)
            for j in range(0, len(x_test), 1000):
                logits = fwd(x_test[j : j + 1000]).float()
                vloss += nn.functional.cross_entropy(
                    logits, data.y_test[j : j + 1000], reduction="sum"
                )
                vcorrect += (logits.argmax(1) == data.y_test[j : j + 1000]).sum()
        model.train()
        weight_norm = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in params]))
        v = torch.stack(
            [vloss / len(x_test), vcorrect / len(x_test), grad_norm, weight_norm]
        ).tolist()
        metrics.add(
            "val_metrics",
            step=step,
            epoch=step / steps_per_epoch,
            val_loss=v[0],
            val_accuracy=v[1],
            grad_norm=v[2],
            weight_norm=v[3],
        )

        if noise_every and step % noise_every == 0:
            g = _generator(torch.device("cpu"), cell.seed, step, 3)
            picks = torch.randint(0, n_train, (cfg.noise_microbatches, micro), generator=g).to(
                device
            )
            xs = [normalize(to_float(data.x_train[p]), mean, std) for p in picks]
            ys = [data.y_train[p] for p in picks]
            signal = np.array(
                [r["loss_nats"] for r in metrics.rows["batch_metrics"][-noise_every:]]
            )
            tail, var, resid = monitors.grad_noise(model, xs, ys, signal)
            metrics.add(
                "noise_metrics",
                step=step,
                epoch=step / steps_per_epoch,
                psd_tail_ratio=tail,
                grad_variance=var,
                residual_power=resid,
            )

        ckpts.offer_best(v[0], step, model.state_dict())
        n_val += 1
        if n_val % cfg.checkpoint_every and step != total_steps:
            continue
        metrics.flush()
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
        beat(force=True)
        info = {
            "step": step,
            "total_steps": total_steps,
            "epoch": step / steps_per_epoch,
            "train_loss": metrics.rows["batch_metrics"][-1]["loss_nats"],
            "val_loss": v[0],
            "val_accuracy": v[1],
        }
        if progress:
            progress(info)
        if step % steps_per_epoch == 0:
            log(
                f"epoch {step // steps_per_epoch}/{cfg.epochs}: train loss "
                f"{info['train_loss']:.4f}, val loss {v[0]:.4f}, val acc {v[1]:.3f}"
            )

    flush(step)
    metrics.truncate_after(diverged_at if diverged_at is not None else step)
    metrics.flush()
    beat(force=True)
    outcome = "diverged" if diverged_at is not None else "completed"
    if diverged_at is not None:
        log(f"nan loss: run diverged at step {diverged_at}; metrics up to it are kept")
    summary = summarize(cell, cfg, metrics, outcome, steps_per_epoch, total_steps)
    summary.update(
        wall_time_s=wall_before + time.monotonic() - t_start,
        attempts=attempts,
        device=str(device),
        grad_accum=cfg.grad_accum,
        diverged_at_step=diverged_at,
        n_params=sum(p.numel() for p in params),
    )
    atomic_write_json(out / "summary.json", summary)
    return summary


def summarize(
    cell: Cell,
    cfg: TrainConfig,
    metrics: MetricLog,
    outcome: str,
    steps_per_epoch: int,
    total_steps: int,
) -> dict:
    """The run's summary: outcome, final and best metrics and its power-law fit."""
    batch = metrics.frame("batch_metrics").rename(columns={"loss_nats": "loss"})
    val = metrics.frame("val_metrics")
    fit = fit_run(batch, val) if len(batch) else {}
    last_val = val.iloc[-1] if len(val) else None
    return {
        **cell.as_dict(),
        "profile": cfg.profile,
        "outcome": outcome,
        "steps": int(batch["step"].max()) if len(batch) else 0,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": cfg.epochs,
        "final_train_loss": float(batch["loss"].iloc[-1]) if len(batch) else None,
        "final_val_loss": float(last_val["val_loss"]) if last_val is not None else None,
        "final_val_accuracy": float(last_val["val_accuracy"]) if last_val is not None else None,
        "best_val_ce": fit.get("best_val_ce"),
        "best_val_epoch": fit.get("best_val_epoch"),
        "r_squared": fit.get("r_squared"),
        "knee_epoch": fit.get("knee_epoch"),
        "val_per_epoch": cfg.val_per_epoch,
        "hessian_every": cfg.hessian_every,
        "noise_every_epochs": cfg.noise_every_epochs,
    }
