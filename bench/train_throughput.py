"""Training throughput of the full-profile ResNet-18 (synthetic CIFAR-shaped data).

    python -m bench.train_throughput [--device cpu|cuda] [--steps N] [--fast]

Measures plain training steps (img/s), then one of each monitor (validation pass,
Hessian lambda_max + trace, gradient-noise measurement), and extrapolates a 50-epoch
run of the `full` profile: its seconds, and the monitors' overhead in % of training
time. On CUDA it also reports model FLOP utilisation against the bf16 peak. Prints one
table.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch import nn

from deconflow.profiles import get_profile
from deconflow.training import monitors
from deconflow.training.augment import normalize, random_resized_crop_flip, to_float
from deconflow.training.data import synthetic_dataset
from deconflow.training.model import build_model

# Forward multiply-accumulates of CIFAR ResNet-18 per 32x32 image (counted below).
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """2 x MACs of convolutions and linear layers for one image, by forward hooks."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total += 2 * out.numel() * k

    def lin_hook(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features

    hooks = [
        m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    hooks += [
        m.register_forward_hook(lin_hook) for m in model.modules() if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return float(total)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 20 CPU)")
    p.add_argument("--fast", action="store_true", help="channels_last + bf16 (+compile)")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    steps = args.steps or (20 if device.type == "cpu" else 200)
    cfg = get_profile("full")
    data = synthetic_dataset(n_train=4096, n_test=cfg.n_test or 10_000).to(device)
    model = build_model(10, 3, 1.0, "batch").to(device)
    fast = args.fast and device.type == "cuda"
    if fast:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast)
    mean, std = data.mean.to(device), data.std.to(device)
    bs = cfg.batch_size
    g = torch.Generator(device=device).manual_seed(0)
    losses = torch.zeros(steps + 10, device=device)

    def step(i: int) -> None:
        idx = torch.randint(0, len(data.y_train), (bs,), device=device, generator=g)
        x = normalize(random_resized_crop_flip(data.x_train[idx], g), mean, std)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            loss = nn.functional.cross_entropy(fwd(x).float(), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[i] = loss.detach()

    for i in range(3 if device.type == "cpu" else 10):  # warm-up
        step(i)
    t_step = timed(lambda: [step(i) for i in range(steps)], device) / steps
    img_s = bs / t_step

    x_test = normalize(to_float(data.x_test), mean, std)

    def validate() -> None:
        model.eval()
        with torch.no_grad(), amp:
            for j in range(0, len(x_test), 1000):
                fwd(x_test[j : j + 1000]).float().sum()
        model.train()

    hx = normalize(to_float(data.x_train[: cfg.hessian_batch]), mean, std)
    hy = data.y_train[: cfg.hessian_batch]
    t_val = timed(validate, device)
    t_hess = timed(
        lambda: monitors.curvature(model, hx, hy, cfg.hessian_iters, cfg.hutchinson_samples, g),
        device,
    )
    xs = [
        normalize(to_float(data.x_train[k * bs : (k + 1) * bs]), mean, std)
        for k in range(cfg.noise_microbatches)
    ]
    ys = [data.y_train[k * bs : (k + 1) * bs] for k in range(cfg.noise_microbatches)]
    sig = np.random.default_rng(0).normal(size=780)
    t_noise = timed(lambda: monitors.grad_noise(model, xs, ys, sig), device)

    spe = 50_000 // bs
    total = cfg.epochs * spe
    n_val, n_hess = cfg.epochs * cfg.val_per_epoch, total // cfg.hessian_every
    n_noise = cfg.epochs // cfg.noise_every_epochs
    t_train = total * t_step
    t_mon = n_val * t_val + n_hess * t_hess + n_noise * t_noise
    flops_img = 3 * forward_flops(model, x_test)  # forward + backward ~ 3x forward
    achieved = flops_img * img_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    rows = [
        (
            "device",
            f"{device.type}: {name or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
        ),
        (
            "path",
            "fast (channels_last, bf16" + (", compile)" if args.compile else ")")
            if fast
            else "plain (fp32, eager)",
        ),
        ("batch / measured steps", f"{bs} / {steps}"),
        ("train step", f"{t_step * 1e3:.1f} ms"),
        ("throughput", f"{img_s:,.0f} img/s"),
        ("validation pass (10k images)", f"{t_val:.2f} s  x {n_val}"),
        ("Hessian lambda_max + trace", f"{t_hess:.2f} s  x {n_hess}"),
        ("gradient-noise measurement", f"{t_noise:.2f} s  x {n_noise}"),
        ("50-epoch run: training only", f"{t_train:,.0f} s ({t_train / 3600:.2f} h)"),
        ("50-epoch run: with monitors", f"{t_train + t_mon:,.0f} s"),
        ("monitor overhead", f"{100 * t_mon / t_train:.1f} % of training time"),
        ("model FLOPs per image (fwd+bwd)", f"{flops_img / 1e9:.2f} GFLOP"),
        (
            "achieved",
            f"{achieved / 1e12:.3f} TFLOP/s"
            + (
                f", MFU {100 * achieved / (peak * 1e12):.1f}% of bf16 peak {peak:.0f}"
                if peak
                else ""
            ),
        ),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
