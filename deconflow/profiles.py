"""Training profiles and the per-run config.

A profile changes sizes (data, width, epochs, monitor frequencies), never the code
path: ``full`` is the SPEC recipe, ``demo`` trains a cell in seconds on a laptop CPU
using scikit-learn's digits (real data shipped inside an installed package), and
``synthetic`` is CIFAR-shaped random data for throughput benchmarks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from deconflow.sweep import Cell, GridError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


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
    # Analysis windows (SPEC section 4), in epochs of this profile; never read by training.
    # The plan's are for 50 epochs; shorter profiles take `scaled_windows(epochs)`.
    # The plan's calculate_slope(5, 15): 0-based, end-exclusive (epochs 6-15 counted from 1).
    alpha_early_epochs: tuple[int, int] = (5, 15)
    knee_epochs: tuple[float, float] = (1.0, 20.0)  # the knee gate's allowed range
    heartbeat_every_s: float = 10.0
    keep_best: int = 3
    # Validation points between saves of latest.pt: once per epoch. A preempted run redoes at
    # most one epoch; saving at every validation point cost 28% of an H200 run (BENCHMARKS).
    checkpoint_every: int = 4
    device: str = "auto"  # auto | cpu | cuda
    # GPU fast path: channels_last memory format, bf16 autocast (BatchNorm statistics and
    # the loss stay fp32), torch.compile (CUDA only). Off by default; the first two also
    # run on CPU so the fast path's code is tested without a GPU.
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    # torch.compile mode: "default", or "reduce-overhead" (CUDA graphs: at batch 128 the step
    # is bound by kernel launches, and graphs halve it on an H200; see BENCHMARKS.md).
    compile_mode: str = "default"
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
        if self.dataset not in ("cifar10", "digits", "synthetic"):
            raise GridError(f"unknown dataset {self.dataset!r}")
        # Every count and interval is checked here, before anything is written: a bad value
        # is a one-line error, never a crash mid-run (checkpoint_every 0 divided by zero).
        for name, low in (
            ("epochs", 1),
            ("val_per_epoch", 1),
            ("checkpoint_every", 1),
            ("keep_best", 1),
            ("hessian_every", 0),  # 0: no curvature
            ("hessian_iters", 1),
            ("hutchinson_samples", 1),
            ("hessian_batch", 1),
            ("noise_every_epochs", 0),  # 0: no gradient noise
            ("noise_microbatches", 2),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise GridError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("n_train", "n_test"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise GridError(f"{name} must be an integer >= 1 or null, got {value!r}")
        for name, low, strict in (
            ("warmup_epochs", 0.0, False),
            ("width_mult", 0.0, True),
            ("heartbeat_every_s", 0.0, False),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or (value <= low if strict else value < low)
            ):
                raise GridError(
                    f"{name} must be a number {'>' if strict else '>='} {low:g}, got {value!r}"
                )
        if not (isinstance(self.device, str) and _DEVICE_RE.match(self.device)):
            raise GridError(f"unknown device {self.device!r}; expected auto, cpu, cuda or cuda:N")
        for name in ("crop_scale", "crop_ratio"):
            lo_hi = getattr(self, name)
            if (
                len(lo_hi) != 2
                or not all(_is_number(x) and math.isfinite(x) for x in lo_hi)
                or not 0 < lo_hi[0] <= lo_hi[1]
            ):
                raise GridError(f"{name} must be two numbers 0 < low <= high, got {lo_hi!r}")
        start_end = tuple(self.alpha_early_epochs)
        if not (
            len(start_end) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in start_end)
            and 1 <= start_end[0] < start_end[1]
        ):
            raise GridError(
                f"alpha_early_epochs must be two whole epochs 1 <= start < end, got {start_end!r}"
            )
        knee = tuple(self.knee_epochs)
        if not (
            len(knee) == 2
            and all(_is_number(x) and math.isfinite(x) for x in knee)
            and 0 <= knee[0] <= knee[1]
        ):
            raise GridError(f"knee_epochs must be two numbers 0 <= low <= high, got {knee!r}")


PLAN_EPOCHS = 50  # the plan's run length, for which its analysis windows are stated


def scaled_windows(epochs: int) -> dict:
    """The plan's analysis windows scaled to a run of `epochs` epochs (same fractions).

    alpha_early: epochs 5..15 of 50 become round(5 e/50)..round(15 e/50), at least epoch 1
    and at least two epochs long, within the run; the knee gate [1, 20] becomes
    [e/50, 20 e/50]. `scaled_windows(50)` is the plan's: (5, 15) and (1.0, 20.0).
    """
    f = epochs / PLAN_EPOCHS
    start = max(1, round(5 * f))
    end = min(max(epochs, start + 1), max(start + 1, round(15 * f)))
    return {"alpha_early_epochs": (start, end), "knee_epochs": (1.0 * f, 20.0 * f)}


PROFILES: dict[str, TrainConfig] = {
    "full": TrainConfig(profile="full"),
    "demo": TrainConfig(
        profile="demo",
        dataset="digits",
        epochs=16,
        **scaled_windows(16),  # alpha_early epochs 2-5, knee gate [0.32, 6.4]
        batch_size=128,
        warmup_epochs=1.0,
        width_mult=0.125,
        crop_scale=(0.5, 1.0),
        hessian_every=40,  # 4 curvature points in 176 steps (steps 40, 80, 120, 160)
        hessian_iters=4,
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


_OVERRIDES_VAR = "DECONFLOW_TRAIN_OVERRIDES"


def _type_ok(value: object, annotation: str) -> bool:
    """Whether a JSON value fits a TrainConfig field's annotation (as written in the class)."""
    kinds = [a.strip() for a in str(annotation).split("|")]
    for k in kinds:
        if k == "None" and value is None:
            return True
        if k == "bool" and isinstance(value, bool):
            return True
        if k == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k == "float" and _is_number(value):
            return True
        if k == "str" and isinstance(value, str):
            return True
        if k == "dict" and isinstance(value, dict):
            return True
        if k.startswith("tuple") and isinstance(value, list | tuple):
            return all(_is_number(v) for v in value)
    return False


def check_overrides(data: dict, where: str = _OVERRIDES_VAR) -> dict:
    """TrainConfig overrides from JSON: unknown keys and wrong types are one-line errors
    naming ``where``; lists become tuples."""
    import difflib

    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GridError(f"{where}: unknown training setting {key!r}{hint}")
        if not _type_ok(value, fields[key]):
            raise GridError(f"{where}: {key} must be {fields[key]}, got {value!r}")
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def profile_from_env(name: str | None = None, **flags) -> TrainConfig:
    """The profile the sweep runs (``DECONFLOW_PROFILE`` unless ``name`` is given) with
    ``DECONFLOW_TRAIN_OVERRIDES``, then ``flags`` on top. Every bad value is a one-line
    error naming the variable (``deconflow train`` used to ignore both silently)."""
    from deconflow import settings

    if name is None:
        name = settings.get("DECONFLOW_PROFILE")
    overrides = check_overrides(settings.get(_OVERRIDES_VAR))
    try:
        get_profile(name, **overrides)
    except (GridError, TypeError) as e:
        if overrides and "unknown profile" not in str(e):
            raise GridError(f"{_OVERRIDES_VAR}: {e}") from None
        raise
    return get_profile(name, **{**overrides, **flags})
