"""Atomic checkpoints: the latest one for resuming, plus the best k by validation loss.

Every write goes to a temporary file in the same folder and is renamed into place,
so a run killed mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deconflow.atomic import atomic_write_bytes, atomic_write_json


class Checkpoints:
    """``latest.pt`` plus ``best-<step>.pt`` files; ``best.json`` lists the best ones."""

    def __init__(self, folder: Path, keep_best: int = 3) -> None:
        self.folder = Path(folder)
        self.keep_best = keep_best

    @property
    def latest_path(self) -> Path:
        return self.folder / "latest.pt"

    def save_latest(self, state: dict) -> None:
        atomic_write_bytes(self.latest_path, lambda f: torch.save(state, f))

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict | None:
        if not self.latest_path.exists():
            return None
        return torch.load(self.latest_path, map_location=map_location, weights_only=False)

    def best(self) -> list[dict]:
        """The kept best checkpoints, best first: dicts with step, val_loss, file."""
        idx = self.folder / "best.json"
        return json.loads(idx.read_text()) if idx.exists() else []

    def offer_best(self, val_loss: float, step: int, model_state: dict) -> bool:
        """Keep the model if it is among the best k by validation loss; drop the worst."""
        if not torch.isfinite(torch.tensor(val_loss)):
            return False
        best = [b for b in self.best() if b["step"] != step]
        if len(best) >= self.keep_best and val_loss >= best[-1]["val_loss"]:
            return False
        name = f"best-{step:07d}.pt"
        atomic_write_bytes(self.folder / name, lambda f: torch.save(model_state, f))
        best = sorted(
            best + [{"step": step, "val_loss": val_loss, "file": name}],
            key=lambda b: (b["val_loss"], b["step"]),
        )
        dropped, best = best[self.keep_best :], best[: self.keep_best]
        atomic_write_json(self.folder / "best.json", best)
        for b in dropped:
            (self.folder / b["file"]).unlink(missing_ok=True)
        return True

    def prune_after(self, step: int) -> None:
        """Forget best checkpoints from beyond ``step`` (their run is being replayed)."""
        best = self.best()
        keep = [b for b in best if b["step"] <= step]
        if keep != best:
            atomic_write_json(self.folder / "best.json", keep)
            for b in best:
                if b["step"] > step:
                    (self.folder / b["file"]).unlink(missing_ok=True)
