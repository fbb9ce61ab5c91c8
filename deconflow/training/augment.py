"""Batched GPU-friendly augmentation: RandomResizedCrop + RandomHorizontalFlip in one op.

torchvision transforms work image by image on the host; here a whole uint8 batch that
already lives on the device is augmented with a single ``affine_grid`` + ``grid_sample``
call, with no Python loop over images and no host synchronisation, so the input pipeline
never stalls the accelerator. Every random number comes from the caller's generator so a
run's augmentation stream is reproducible from its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1] (evaluation path: no augmentation)."""
    return x_uint8.to(torch.float32).div_(255.0)


def normalize(x_float: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel standardisation with training-set stats (both in [0, 1] scale)."""
    mean = mean.to(device=x_float.device, dtype=x_float.dtype)[:, None, None]
    std = std.to(device=x_float.device, dtype=x_float.dtype)[:, None, None]
    return (x_float - mean) / std


def random_resized_crop_flip(
    x_uint8: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    out_size: int | None = None,
    flip_p: float = 0.5,
) -> torch.Tensor:
    """Random resized crop plus horizontal flip for a B×C×H×W uint8 batch, as float in [0, 1].

    Per image: area fraction ~ U(scale), aspect ratio log-uniform in ``ratio``, box sides
    clamped to fit the image (torchvision's fallback, without its rejection loop, which
    would need a host sync), position uniform over the valid range, flipped with
    probability ``flip_p``. The crop box is expressed as an affine map from output to
    input normalised coordinates (a negative x scale is the flip) and resampled
    bilinearly back to H×W (or ``out_size``). The result is not normalised.
    """
    if x_uint8.dim() != 4:
        raise ValueError(f"expected a B×C×H×W batch, got shape {tuple(x_uint8.shape)}")
    b, c, h, w = x_uint8.shape
    out_h, out_w = (out_size, out_size) if out_size is not None else (h, w)
    device = x_uint8.device

    # One draw per batch: area, log-aspect, x position, y position, flip.
    r = torch.rand((b, 5), generator=generator, device=device, dtype=torch.float32)
    area = (scale[0] + (scale[1] - scale[0]) * r[:, 0]) * (h * w)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * r[:, 1])  # width / height
    box_w = torch.sqrt(area * aspect).clamp(max=w)
    box_h = torch.sqrt(area / aspect).clamp(max=h)

    # In normalised coords ([-1, 1] spans the image edges with align_corners=False) the box
    # has half-extent s = box/size and a centre uniform in [-(1 - s), 1 - s].
    sx = box_w / w
    sy = box_h / h
    tx = (1.0 - sx) * (2.0 * r[:, 2] - 1.0)
    ty = (1.0 - sy) * (2.0 * r[:, 3] - 1.0)
    sign = torch.where(r[:, 4] < flip_p, -1.0, 1.0)
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [torch.stack([sx * sign, zero, tx], dim=1), torch.stack([zero, sy, ty], dim=1)], dim=1
    )

    grid = F.affine_grid(theta, [b, c, out_h, out_w], align_corners=False)
    return F.grid_sample(
        to_float(x_uint8), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
