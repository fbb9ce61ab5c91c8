"""Training profiles and the per-run config.

A profile changes sizes (data, width, epochs, monitor frequencies), never the code
path: ``full`` is the SPEC recipe, ``demo`` trains a cell in seconds on a laptop CPU
using scikit-learn's digits (real data shipped inside an installed package), and
``synthetic`` is CIFAR-shaped random data for throughput benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from deconflow.sweep import Cell, GridError


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides its cell. Frequencies default to SPEC section 3."""

    profile: str = "custom"  # the PROFILES entry these sizes came from; the defaults are `full`
    dataset: str = "cifar10"  # cifar10 | digits | synthetic
    data_dir: str = "data/cifar-10-batches-py"
    n_train: int | None = None  # cap on training examples (None: all)
    n_test: int | None = None
    epochs: int = 50
    batch_size: int = 128
    grad_accum: int = 1  # micro-batches per step; the effective batch stays batch_size
    warmup_epochs: float = 5.0
    width_mult: float = 1.0  # base width multiplier; the narrow variant halves it
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    val_per_epoch: int = 4
    hessian_every: int = 500  # steps
    hessian_iters: int = 20  # power iterations for lambda_max
    hutchinson_samples: int = 10
    hessian_batch: int = 128
    noise_every_epochs: int = 2
    noise_microbatches: int = 8  # micro-batches for the gradient-variance estimate
    heartbeat_every_s: float = 10.0
    keep_best: int = 3
    checkpoint_every: int = 1  # validation points between saves of latest.pt
    device: str = "auto"  # auto | cpu | cuda
    # GPU fast path: channels_last memory format, bf16 autocast (BatchNorm statistics and
    # the loss stay fp32), torch.compile (CUDA only). Off by default; the first two also
    # run on CPU so the fast path's code is tested without a GPU.
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    # Fault injection for reliability tests: "nan@STEP", "oom@STEP", "crash@STEP", "hang@STEP".
    fault: str = ""
    extra: dict = field(default_factory=dict)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.grad_accum <= 0 or self.batch_size % self.grad_accum:
            raise GridError(
                f"batch_size ({self.batch_size}) must be a positive multiple of "
                f"grad_accum ({self.grad_accum})"
            )
        if self.epochs <= 0:
            raise GridError(f"epochs must be > 0, got {self.epochs}")
        if self.dataset not in ("cifar10", "digits", "synthetic"):
            raise GridError(f"unknown dataset {self.dataset!r}")


PROFILES: dict[str, TrainConfig] = {
    "full": TrainConfig(profile="full"),
    "demo": TrainConfig(
        profile="demo",
        dataset="digits",
        epochs=16,  # alpha_early needs epochs 5 to 15
        batch_size=128,
        warmup_epochs=1.0,
        width_mult=0.125,
        crop_scale=(0.5, 1.0),
        hessian_every=60,
        hessian_iters=5,
        hutchinson_samples=2,
        hessian_batch=64,
        noise_every_epochs=2,
        noise_microbatches=3,
        heartbeat_every_s=2.0,
        checkpoint_every=4,  # once per epoch: the demo is I/O-bound otherwise
    ),
    "synthetic": TrainConfig(
        profile="synthetic", dataset="synthetic", n_train=50_000, n_test=10_000
    ),
}


def get_profile(name: str, **overrides) -> TrainConfig:
    if name not in PROFILES:
        raise GridError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
    return PROFILES[name].replace(**overrides) if overrides else PROFILES[name]


@dataclass(frozen=True)
class VariantSpec:
    """How a SPEC section 2 variant differs from base."""

    norm: str = "batch"  # batch | none
    optimizer: str = "sgd"  # sgd | adamw
    width_factor: float = 1.0
    clip_grad_norm: float | None = None


VARIANT_SPECS: dict[str, VariantSpec] = {
    "base": VariantSpec(),
    "bn_off": VariantSpec(norm="none", clip_grad_norm=1.0),
    "narrow": VariantSpec(width_factor=0.5),
    "adamw": VariantSpec(optimizer="adamw"),
}


def variant_spec(cell: Cell) -> VariantSpec:
    return VARIANT_SPECS[cell.variant]
