"""A run's step counts: its length, the learning-rate schedule, when each monitor fires."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deconflow.profiles import TrainConfig


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of 1-based ``step``: linear warm-up to base_lr, then cosine to 0.

    The cosine reaches 0 at the end of the last step, so every step's lr is > 0.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps - 1) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Schedule:
    """Step counts of a run: its length, warm-up and when each monitor fires."""

    batch: int
    micro: int  # micro-batch of gradient accumulation
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    val_steps: frozenset[int]
    noise_every: int  # steps

    @classmethod
    def of(cls, cfg: TrainConfig, n_train: int) -> Schedule:
        steps_per_epoch = n_train // cfg.batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"batch size {cfg.batch_size} is larger than the training set ({n_train})"
            )
        val_steps = {
            max(1, round(k * steps_per_epoch / cfg.val_per_epoch))
            for k in range(1, cfg.epochs * cfg.val_per_epoch + 1)
        }
        return cls(
            batch=cfg.batch_size,
            micro=cfg.batch_size // cfg.grad_accum,
            steps_per_epoch=steps_per_epoch,
            total_steps=cfg.epochs * steps_per_epoch,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            val_steps=frozenset(val_steps),
            noise_every=cfg.noise_every_epochs * steps_per_epoch,
        )

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch
