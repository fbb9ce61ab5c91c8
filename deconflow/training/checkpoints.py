"""Atomic checkpoints: the latest one for resuming (and the one before it), plus the best k by
validation loss.

Every write is serialized in memory, written to a temporary file in the same folder, fsynced
and renamed into place, so a run killed mid-write never leaves a truncated checkpoint behind.
A checkpoint that is damaged anyway (a disk error, a copy cut short) is never fatal: resuming
falls back to ``latest.prev.pt``, then to a fresh start, and says so in the log. A full disk
is one line naming the file (:class:`DiskFullError`), not a serializer's internal assertion.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from deconflow.atomic import atomic_write_bytes, atomic_write_json
from deconflow.protocol import BEST_INDEX, LATEST_CHECKPOINT, PREV_CHECKPOINT
from deconflow.sweep import GridError

_BEST_RE = re.compile(r"^best-(\d+)\.pt$")
_NEXT = ".latest.next.pt"  # a complete new latest, between its write and its rename
RESUME_KEYS = ("model", "optimizer", "step", "wall_time_s", "attempts", "fingerprint")


class CheckpointMismatch(GridError):
    """The checkpoint belongs to another config (cell, profile or sizes): a config error."""


class CheckpointError(RuntimeError):
    """A checkpoint that loaded could not be applied: the message starts 'corrupt checkpoint'."""


class DiskFullError(OSError):
    """No space left while writing a run's file; one line naming the file and the free space."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        folder = _existing_parent(self.path)
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        self.message = f"disk full: cannot write {self.path} ({free} on {_mount_point(folder)})"
        super().__init__(errno.ENOSPC, self.message, str(self.path))

    def __str__(self) -> str:
        return self.message


def _existing_parent(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mount_point(path: Path) -> Path:
    p = Path(path).absolute()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


@contextmanager
def disk_full_is_one_line(path: Path):
    """Turn ENOSPC/EDQUOT while writing ``path`` into a :class:`DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path) from None
        raise


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Checkpoints:
    """``latest.pt`` (and ``latest.prev.pt``) plus ``best-<step>.pt`` files listed in
    ``best.json``."""

    def __init__(
        self, folder: Path, keep_best: int = 3, log: Callable[[str], None] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.keep_best = keep_best
        self.log = log or _print
        self._pending: dict[int, tuple[float, dict]] = {}  # step -> (val loss, state copy)

    @property
    def latest_path(self) -> Path:
        return self.folder / LATEST_CHECKPOINT

    @property
    def prev_path(self) -> Path:
        return self.folder / PREV_CHECKPOINT

    def _write(self, path: Path, obj) -> None:
        """Serialize in memory first: a write error is then the OS's (ENOSPC), not torch's."""
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getbuffer()
        with disk_full_is_one_line(path):
            atomic_write_bytes(path, lambda f: f.write(data))

    def save_latest(self, state: dict) -> None:
        """The new latest; the one it replaces becomes ``latest.prev.pt``."""
        nxt = self.folder / _NEXT
        self._write(nxt, state)
        if self.latest_path.exists():
            os.replace(self.latest_path, self.prev_path)
        os.replace(nxt, self.latest_path)

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict | None:
        """``latest.pt`` as saved, or None when there is none (no fallback: see load_resumable)."""
        if not self.latest_path.exists():
            return None
        return torch.load(self.latest_path, map_location=map_location, weights_only=False)

    def load_resumable(
        self,
        map_location: str | torch.device = "cpu",
        check: Callable[[dict], None] | None = None,
    ) -> dict | None:
        """The newest intact checkpoint to resume from, or None for a fresh start.

        Tries ``latest.pt``, then a complete new latest left between its write and its rename,
        then ``latest.prev.pt``. A file that does not load, lacks the resume state or fails
        ``check`` is logged and set aside as ``<name>.corrupt``; a :class:`CheckpointMismatch`
        from ``check`` (another config) is raised, never skipped. The state's ``_source`` is
        the file it came from.
        """
        candidates = [self.latest_path, self.folder / _NEXT, self.prev_path]
        found = [p for p in candidates if p.exists()]
        bad: list[str] = []
        for path in found:
            try:
                state = torch.load(path, map_location=map_location, weights_only=False)
                if not isinstance(state, dict) or any(k not in state for k in RESUME_KEYS):
                    raise ValueError("not a resume checkpoint (keys missing)")
                if check is not None:
                    check(state)
            except CheckpointMismatch:
                raise
            except Exception as e:  # truncated zip, bad pickle, EOF, wrong shapes, disk error
                why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                aside = path.with_name(path.name + ".corrupt")
                os.replace(path, aside)
                self.log(f"checkpoint {path} is corrupt ({why}); set aside as {aside.name}")
                bad.append(path.name)
                continue
            if bad:
                self.log(
                    f"resuming from the newest intact checkpoint {path.name} "
                    f"(step {state['step']}) instead of {', '.join(bad)}"
                )
            state["_source"] = str(path)
            return state
        if bad:
            self.log(f"no intact checkpoint in {self.folder}: starting fresh from step 0")
        return None

    def best(self) -> list[dict]:
        """The kept best checkpoints, best first: dicts with step, val_loss, file.

        An unreadable ``best.json`` (truncated, say) is rebuilt from the ``best-*.pt`` files and
        the run's validation losses, and the rebuild is logged.
        """
        idx = self.folder / BEST_INDEX
        if not idx.exists():
            return []
        try:
            best = json.loads(idx.read_text())
            if not isinstance(best, list) or not all(
                isinstance(b, dict) and {"step", "val_loss", "file"} <= b.keys() for b in best
            ):
                raise ValueError("not a list of {step, val_loss, file}")
            return best
        except (OSError, ValueError) as e:
            best = self._rebuild_best()
            with disk_full_is_one_line(idx):
                atomic_write_json(idx, best)
            why = str(e).splitlines()[0][:200]
            self.log(
                f"checkpoint index {idx} was unreadable ({why}); rebuilt with {len(best)} "
                "best checkpoint(s) from the best-*.pt files and the validation losses"
            )
            return best

    def _rebuild_best(self) -> list[dict]:
        """Entries for the best-*.pt files whose step has a validation loss; others dropped."""
        losses: dict[int, float] = {}
        from deconflow.training.metrics_io import has_family, read_family

        if has_family(self.folder.parent, "val_metrics"):
            try:
                df = read_family(self.folder.parent, "val_metrics", columns=["step", "val_loss"])
                losses = dict(
                    zip(df["step"].astype(int), df["val_loss"].astype(float), strict=True)
                )
            except Exception:  # unreadable metrics: nothing to rank by
                losses = {}
        entries, orphans = [], []
        for f in sorted(self.folder.glob("best-*.pt")):
            m = _BEST_RE.match(f.name)
            step = int(m.group(1)) if m else None
            loss = losses.get(step) if step is not None else None
            if loss is None or loss != loss:  # no row, or NaN
                orphans.append(f)
            else:
                entries.append({"step": step, "val_loss": loss, "file": f.name})
        entries.sort(key=lambda b: (b["val_loss"], b["step"]))
        for b in entries[self.keep_best :]:
            orphans.append(self.folder / b["file"])
        for f in orphans:
            f.unlink(missing_ok=True)
        return entries[: self.keep_best]

    def offer_best(self, val_loss: float, step: int, model_state: dict) -> bool:
        """Hold the model if it is among the best k by validation loss (not written yet).

        The candidate is a copy of the state on its own device (no host transfer); it is
        written by :meth:`write_best`, which the training calls with each latest
        checkpoint, so best checkpoints cost at most one write per checkpoint interval (once
        per epoch by default), never one per improving validation. At most k are held.
        """
        if not math.isfinite(val_loss):
            return False
        best = [b for b in self.best() if b["step"] != step and b["step"] not in self._pending]
        ranked = self._ranked(best, {**self._pending, step: (val_loss, None)})
        if step not in {b["step"] for b in ranked[: self.keep_best]}:
            return False
        snapshot = {k: v.detach().clone() for k, v in model_state.items()}
        self._pending[step] = (val_loss, snapshot)
        kept = {b["step"] for b in ranked[: self.keep_best]}
        for s in [s for s in self._pending if s not in kept]:
            del self._pending[s]
        return True

    @staticmethod
    def _ranked(best: list[dict], pending: dict) -> list[dict]:
        entries = best + [
            {"step": s, "val_loss": loss, "file": f"best-{s:07d}.pt"}
            for s, (loss, _) in pending.items()
        ]
        return sorted(entries, key=lambda b: (b["val_loss"], b["step"]))

    def write_best(self) -> int:
        """Write the held candidates that are still among the best k (each atomically), then
        ``best.json``, then drop the files that fell out; returns the number written."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        best = [b for b in self.best() if b["step"] not in pending]
        ranked = self._ranked(best, pending)
        keep, dropped = ranked[: self.keep_best], ranked[self.keep_best :]
        written = 0
        for b in keep:
            if b["step"] in pending:
                self._write(self.folder / b["file"], pending[b["step"]][1])
                written += 1
        with disk_full_is_one_line(self.folder / BEST_INDEX):
            atomic_write_json(self.folder / BEST_INDEX, keep)
        for b in dropped:
            if b["step"] not in pending:
                (self.folder / b["file"]).unlink(missing_ok=True)
        return written

    def prune_after(self, step: int) -> None:
        """Forget best checkpoints from beyond ``step`` (their run is being replayed)."""
        self._pending = {s: c for s, c in self._pending.items() if s <= step}
        best = self.best()
        keep = [b for b in best if b["step"] <= step]
        if keep != best:
            with disk_full_is_one_line(self.folder / BEST_INDEX):
                atomic_write_json(self.folder / BEST_INDEX, keep)
            for b in best:
                if b["step"] > step:
                    (self.folder / b["file"]).unlink(missing_ok=True)
