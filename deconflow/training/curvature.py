"""Hessian curvature probes of SPEC section 3 (every 500 steps), all matrix-free.

Only Hessian-vector products are needed, so the p x p Hessian of a ResNet is never built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Hvp = Callable[[torch.Tensor], torch.Tensor]


def _randn_like(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def power_iteration(
    hvp: Hvp,
    dim_or_like: torch.Tensor,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration, read as a Rayleigh quotient.

    `dim_or_like` fixes the shape, dtype and device of the probe vector.
    """
    v = _randn_like(dim_or_like, generator)
    v = v / v.norm()
    eig = 0.0
    for _ in range(iters):
        hv = hvp(v)
        eig = float(torch.dot(v.flatten(), hv.flatten()))
        norm = hv.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        v = hv / norm
    else:
        eig = float(torch.dot(v.flatten(), hvp(v).flatten()))
    return eig


def hutchinson_trace(
    hvp: Hvp,
    like: torch.Tensor,
    samples: int = 10,
    generator: torch.Generator | None = None,
) -> float:
    """Hessian trace estimate: mean of v·Hv over Rademacher probes v (E[v vᵀ] = I)."""
    total = 0.0
    for _ in range(samples):
        bits = torch.randint(
            0, 2, like.shape, generator=generator, device=like.device, dtype=torch.int64
        )
        v = bits.to(like.dtype) * 2 - 1
        total += float(torch.dot(v.flatten(), hvp(v).flatten()))
    return total / samples


def model_hvp(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Hvp:
    """Closure v -> H v over the flat concatenation of `params` for the scalar loss_fn().

    The gradient graph is built once (create_graph=True) and reused by every call, so
    each product costs one extra backward pass.
    """
    params = list(params)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if not flat_grad.requires_grad:  # loss linear in params: the Hessian is zero
            return torch.zeros_like(flat_grad).detach()
        dot = torch.dot(flat_grad, v.reshape(-1).to(flat_grad.dtype))
        hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
        parts = [
            torch.zeros_like(p).reshape(-1) if h is None else h.reshape(-1)
            for h, p in zip(hv, params, strict=True)
        ]
        return torch.cat(parts).detach()

    return hvp
