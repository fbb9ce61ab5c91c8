"""SGD with momentum and AdamW for the training loop, on torch's own functional updates.

``torch.optim``'s optimizer classes import ``torch._dynamo`` on their first method call
even when nothing is compiled: about 2 s of CPU, a third of a one-epoch demo training.
These classes keep the part of their interface the loop uses (``param_groups``,
``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``) and run the very update
functions the classes call (``torch.optim.sgd.sgd``, ``torch.optim.adamw.adamw``) with the
same defaults, so every step is bit-identical and a state dict has ``torch.optim``'s layout:
checkpoints written by either load in the other.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd


class _Optimizer:
    """One parameter group; per-parameter state keyed by the parameter's index."""

    def __init__(self, params, group: dict) -> None:
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups: list[dict] = [dict(group)]
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.requires_grad_(False)
                p.grad.zero_()

    def state_dict(self) -> dict:
        return {
            "state": {i: dict(s) for i, s in self.state.items()},
            "param_groups": [{**self.param_groups[0], "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("the optimizer state has another number of parameters")
        index = {pid: i for i, pid in enumerate(groups[0]["params"])}
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        self.state = {}
        for pid, s in state_dict["state"].items():
            p = self.params[index[pid]]
            self.state[index[pid]] = {k: self._placed(k, v, p) for k, v in s.items()}

    def _placed(self, key: str, value, p: torch.Tensor):
        """A loaded state tensor where ``torch.optim`` keeps it: buffers beside their
        parameter, in its dtype; AdamW's ``step`` count a float32 scalar on the CPU."""
        if not torch.is_tensor(value):
            return value
        if key == "step":
            return value.to(dtype=torch.float32, device="cpu")
        return value.to(device=p.device, dtype=p.dtype)

    def _with_grad(self) -> list[int]:
        return [i for i, p in enumerate(self.params) if p.grad is not None]


class SGD(_Optimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay)``."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": 0,
                "weight_decay": weight_decay,
                "nesterov": False,
                "maximize": False,
                "foreach": None,
                "differentiable": False,
                "fused": None,
            },
        )

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        idx = self._with_grad()
        bufs = [self.state.get(i, {}).get("momentum_buffer") for i in idx]
        sgd(
            [self.params[i] for i in idx],
            [self.params[i].grad for i in idx],
            bufs,
            foreach=g["foreach"],
            fused=g["fused"],
            weight_decay=g["weight_decay"],
            momentum=g["momentum"],
            lr=g["lr"],
            dampening=g["dampening"],
            nesterov=g["nesterov"],
            maximize=g["maximize"],
        )
        if g["momentum"] != 0:
            for i, buf in zip(idx, bufs, strict=True):
                self.state.setdefault(i, {})["momentum_buffer"] = buf


class AdamW(_Optimizer):
    """``torch.optim.AdamW(params, lr, betas, weight_decay)`` (eps 1e-8, no amsgrad)."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        eps: float = 1e-8,
    ):
        super().__init__(
            params,
            {
                "lr": lr,
                "betas": tuple(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "decoupled_weight_decay": True,
            },
        )

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        idx = self._with_grad()
        for i in idx:
            if i not in self.state:
                p = self.params[i]
                self.state[i] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        st = [self.state[i] for i in idx]
        adamw(
            [self.params[i] for i in idx],
            [self.params[i].grad for i in idx],
            [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st],
            [],
            [s["step"] for s in st],
            foreach=g["foreach"],
            capturable=g["capturable"],
            differentiable=g["differentiable"],
            fused=g["fused"],
            amsgrad=g["amsgrad"],
            beta1=g["betas"][0],
            beta2=g["betas"][1],
            lr=g["lr"],
            weight_decay=g["weight_decay"],
            eps=g["eps"],
            maximize=g["maximize"],
        )
