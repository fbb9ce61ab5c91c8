"""Hessian curvature probes of SPEC section 3 (every 500 steps), all matrix-free.

Only Hessian-vector products are needed, so the p x p Hessian of a ResNet is never built.

The gradient graph of the loss is built once per measurement; every Hessian-vector product
is one backward pass through it with the probes as gradient outputs, and the Hutchinson
probes go through it together (``is_grads_batched``: one batched product instead of one per
probe). Nothing in a product or in the power iteration reads a value back to the host: no
``.item()``/``float()`` in the loops (power iteration runs a fixed number of iterations and
freezes on the device once the vector stops being usable), so the products can be captured
in a CUDA graph (the backward of a retained graph with static probe buffers). The caller
reads the two results back once per measurement. The arithmetic is today's: the same
products, dots and probe streams, so the estimates match the per-probe code (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Hvp = Callable[[torch.Tensor], torch.Tensor]  # (n, P) probes -> (n, P) products


def _randn_like(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def power_iteration(
    hvp: Hvp,
    dim_or_like: torch.Tensor,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """:func:`power_iteration_device`, read back as a float."""
    return float(power_iteration_device(hvp, dim_or_like, iters, generator))


def power_iteration_device(
    hvp: Hvp,
    dim_or_like: torch.Tensor,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Largest-magnitude Hessian eigenvalue by power iteration, read as a Rayleigh quotient
    (a 0-d device tensor; ``hvp`` takes and returns a batch of flat vectors).

    ``iters`` products update the vector; a last one gives the quotient of the final vector.
    A product whose norm is zero or not finite stops the iteration (on the device: the vector
    and the estimate freeze), keeping the quotient of the vector that produced it.
    `dim_or_like` fixes the shape, dtype and device of the probe vector.
    """
    v = _randn_like(dim_or_like, generator).reshape(-1)
    v = v / v.norm()
    eig = torch.zeros((), dtype=v.dtype, device=v.device)
    stopped = torch.zeros((), dtype=torch.bool, device=v.device)
    for _ in range(iters):
        hv = hvp(v[None])[0]
        eig = torch.where(stopped, eig, torch.dot(v, hv))
        norm = hv.norm()
        stopped = stopped | ~torch.isfinite(norm) | (norm == 0)
        v = torch.where(stopped, v, hv / norm)
    return torch.where(stopped, eig, torch.dot(v, hvp(v[None])[0]))


def rademacher_probes(
    like: torch.Tensor, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(samples, P) probes of ±1, drawn one after another from ``generator`` (the same stream
    as drawing them one at a time)."""
    out = torch.empty((samples, like.numel()), dtype=like.dtype, device=like.device)
    for i in range(samples):
        bits = torch.randint(
            0, 2, like.shape, generator=generator, device=like.device, dtype=torch.int64
        )
        out[i] = bits.reshape(-1).to(like.dtype) * 2 - 1
    return out


def hutchinson_trace(
    hvp: Hvp,
    like: torch.Tensor,
    samples: int = 10,
    generator: torch.Generator | None = None,
) -> float:
    """:func:`hutchinson_trace_device`, read back as a float."""
    return float(hutchinson_trace_device(hvp, like, samples, generator))


def hutchinson_trace_device(
    hvp: Hvp,
    like: torch.Tensor,
    samples: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hessian trace estimate: mean of v·Hv over Rademacher probes v (E[v vᵀ] = I), all the
    probes in one batched product; a 0-d device tensor."""
    v = rademacher_probes(like, samples, generator)
    hv = hvp(v)
    dots = torch.stack([torch.dot(v[i], hv[i]) for i in range(samples)])
    return dots.double().mean()


def model_hvp(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Hvp:
    """V -> H V over the flat concatenation of ``params`` for the scalar loss_fn(): a batch
    (n, P) of probes gives (n, P) products, one flat (P,) probe one (P,) product.

    The gradient graph is built once (``create_graph=True``) and each call runs one backward
    pass through it for the whole batch of probes (``is_grads_batched``: vmap over the
    gradient outputs), the probes passed as views of the flat batch (no copy in, one
    concatenation out), with no new graph nodes between calls.
    """
    params = list(params)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if v.dim() == 1:
            return hvp(v[None])[0]
        n = v.shape[0]
        v = v.reshape(n, -1).to(params[0].dtype)
        if not live:  # loss linear in params: the Hessian is zero
            return torch.zeros_like(v)
        outs = [t.view(n, *s) for t, s in zip(v.split(sizes, dim=1), shapes, strict=True)]
        hv = torch.autograd.grad(
            [grads[i] for i in live],
            params,
            grad_outputs=[outs[i] if n > 1 else outs[i][0] for i in live],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=n > 1,
        )
        parts = [
            torch.zeros((n, p.numel()), dtype=v.dtype, device=v.device)
            if h is None
            else h.reshape(n, -1)
            for h, p in zip(hv, params, strict=True)
        ]
        return torch.cat(parts, dim=1).detach()

    return hvp
