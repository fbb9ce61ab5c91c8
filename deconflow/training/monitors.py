"""The slow monitors of SPEC section 3: Hessian curvature and gradient noise.

They run in eval mode (BatchNorm uses its running statistics) so that measuring never
changes the training state, and draw every random probe from generators seeded by
(seed, step), so a resumed run measures exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from deconflow.training.curvature import (
    hutchinson_trace_device,
    model_hvp,
    power_iteration_device,
)
from deconflow.training.spectra import gradient_variance, psd_tail_ratio, residual_power


def _eval_mode(model: nn.Module):
    class _Ctx:
        def __enter__(self):
            self.was = model.training
            model.eval()

        def __exit__(self, *exc):
            model.train(self.was)

    return _Ctx()


def curvature(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    iters: int,
    samples: int,
    generator: torch.Generator,
    amp=None,
) -> tuple[float, float]:
    """(lambda_max, Hessian trace) of the cross-entropy on a fixed batch.

    ``amp`` is the training's autocast: with bf16 the Hessian-vector products run in bf16
    too (within 0.3% of fp32 on an H200, same weights and probes; BENCHMARKS.md). The
    products and the power iteration stay on the device; the two numbers are read back
    together, once per measurement.
    """
    lam, tr = curvature_tensors(model, x, y, iters, samples, generator, amp)
    lam_f, tr_f = torch.stack([lam.float(), tr.float()]).tolist()
    return lam_f, tr_f


def curvature_tensors(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    iters: int,
    samples: int,
    generator: torch.Generator,
    amp=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`curvature` as two 0-d device tensors (no host synchronisation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    amp = amp if amp is not None else contextlib.nullcontext()

    def loss() -> torch.Tensor:
        with amp:
            logits = model(x)
        return nn.functional.cross_entropy(logits.float(), y)

    with _eval_mode(model):
        hvp = model_hvp(loss, params)
        like = torch.cat([p.detach().reshape(-1) for p in params])
        lam = power_iteration_device(hvp, like, iters=iters, generator=generator)
        tr = hutchinson_trace_device(hvp, like, samples=samples, generator=generator)
    return lam, tr


def grad_noise(
    model: nn.Module,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    loss_signal: np.ndarray,
) -> tuple[float, float, float]:
    """(PSD tail ratio, gradient variance, residual power).

    The tail ratio and residual power describe the recent batch-loss signal; the
    gradient variance is measured across ``len(xs)`` independent micro-batches.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    with _eval_mode(model):
        for x, y in zip(xs, ys, strict=True):
            g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
            grads.append(torch.cat([t.reshape(-1) for t in g]))
    var = gradient_variance(torch.stack(grads))
    finite = loss_signal[np.isfinite(loss_signal)]
    tail = psd_tail_ratio(finite) if len(finite) >= 8 else float("nan")
    resid = residual_power(finite) if len(finite) >= 2 else float("nan")
    return tail, var, resid
