"""Damaged checkpoints and a full disk, on the real training loop and real files.

A run that crashed mid-way (an injected crash at step 40: checkpoints at steps 11, 22, 33) is
resumed after its files were damaged; the resumed run must log what it did and end with exactly
the rows of an uninterrupted run. The full disk is a real 1 MiB tmpfs (root only).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from deconflow.failures import (
    CORRUPT_CHECKPOINT,
    DISK_FULL,
    classify_log,
    failure_line,
)
from deconflow.profiles import get_profile
from deconflow.protocol import FAMILIES
from deconflow.resources import LocalProcessResource
from deconflow.sensors.policy import RunInfo, WatchdogSettings, decide
from deconflow.sweep import Cell
from deconflow.training.checkpoints import Checkpoints, DiskFullError
from deconflow.training.metrics_io import read_family
from deconflow.training.train import train

pytestmark = pytest.mark.slow  # trains and resumes

CELL = Cell("base", 0.1, 1e-3, 0)
CFG = get_profile("demo", epochs=5)  # 55 steps; latest.pt saved at 11, 22, 33, 44, 55


def _frames(out: Path) -> dict[str, pd.DataFrame]:
    return {f: read_family(out, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / CELL.key
    train(CELL, CFG, out, log=lambda m: None)
    return out


def _crashed(tmp_path: Path) -> Path:
    """A run that crashed at step 40: latest.pt at step 33, latest.prev.pt at step 22."""
    out = tmp_path / CELL.key
    with pytest.raises(RuntimeError, match="injected crash at step 40"):
        train(CELL, CFG.replace(fault="crash@40"), out, log=lambda m: None)
    ck = out / "checkpoints"
    assert torch.load(ck / "latest.pt", weights_only=False)["step"] == 33
    assert torch.load(ck / "latest.prev.pt", weights_only=False)["step"] == 22
    return out


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _same_rows(a: Path, b: Path) -> None:
    fa, fb = _frames(a), _frames(b)
    for fam in FAMILIES:
        assert fb[fam]["step"].is_unique, fam
        pd.testing.assert_frame_equal(fa[fam], fb[fam], check_exact=False, rtol=1e-6, atol=1e-7)


def test_truncated_latest_falls_back_to_the_previous_checkpoint(tmp_path, reference) -> None:
    out = _crashed(tmp_path)
    ck = out / "checkpoints"
    _truncate(ck / "latest.pt")
    _truncate(ck / "best.json")  # and a half-written index of the best checkpoints
    logs: list[str] = []
    summary = train(CELL, CFG, out, log=logs.append)
    text = "\n".join(logs)
    assert "latest.pt is corrupt" in text and "latest.pt.corrupt" in text, text
    assert "resuming from the newest intact checkpoint latest.prev.pt (step 22)" in text, text
    assert "resumed base__lr0.1_wd0.001_s0 from step 22/55" in text
    assert "best.json was unreadable" in text and "rebuilt" in text, text
    assert summary["outcome"] == "completed" and summary["steps"] == 55
    _same_rows(reference, out)
    best = json.loads((ck / "best.json").read_text())
    val = _frames(out)["val_metrics"].sort_values(["val_loss", "step"])
    assert [b["step"] for b in best] == list(val["step"].head(3))
    assert sorted(p.name for p in ck.glob("best-*.pt")) == sorted(b["file"] for b in best)


def test_no_intact_checkpoint_is_a_logged_fresh_start(tmp_path, reference) -> None:
    out = _crashed(tmp_path)
    ck = out / "checkpoints"
    _truncate(ck / "latest.pt", 0.3)
    (ck / "latest.prev.pt").write_bytes(b"not a checkpoint")
    logs: list[str] = []
    summary = train(CELL, CFG, out, log=logs.append)
    text = "\n".join(logs)
    assert "latest.prev.pt is corrupt" in text
    assert "no intact checkpoint" in text and "starting fresh from step 0" in text, text
    assert summary["attempts"] == 1 and summary["steps"] == 55
    _same_rows(reference, out)


def test_unusable_checkpoint_state_is_class_corrupt_checkpoint(tmp_path) -> None:
    """A checkpoint that loads but whose run state cannot be restored (its metrics are
    damaged) fails the run as corrupt_checkpoint; the policy retries it from scratch."""
    out = _crashed(tmp_path)
    (out / "batch_metrics.parquet").write_bytes(b"PAR1 garbage")
    proc = subprocess.run(
        LocalProcessResource().command(CELL, "demo", {"epochs": 5}, out),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert classify_log(log) == CORRUPT_CHECKPOINT
    line = failure_line(log)
    assert line.startswith("deconflow.training.checkpoints.CheckpointError: corrupt checkpoint")
    run = RunInfo("r1", "failed", {"deconflow/failure_class": CORRUPT_CHECKPOINT})
    d = decide([run], WatchdogSettings(), "s", cell=CELL.key)
    assert d.action == "retry" and "deconflow/resume" not in d.tags  # fresh, not a resume
    again = RunInfo("r2", "failed", {"deconflow/failure_class": CORRUPT_CHECKPOINT})
    assert decide([again, run], WatchdogSettings(), "s", cell=CELL.key).action == "alert"


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), or a skip when this host cannot mount one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_checkpoint_is_one_line_naming_the_file(tiny_disk) -> None:
    ck = Checkpoints(tiny_disk / "checkpoints")
    (tiny_disk / "checkpoints").mkdir()
    ck.save_latest({"step": 1, "w": torch.zeros(1000)})  # fits
    big = {"step": 2, "w": torch.zeros(400_000)}  # 1.6 MB: does not
    with pytest.raises(DiskFullError) as e:
        ck.save_latest(big)
    msg = str(e.value)
    assert msg.startswith(f"disk full: cannot write {tiny_disk / 'checkpoints'}")
    assert str(tiny_disk) in msg and "MiB free" in msg and "\n" not in msg
    assert "enforce fail" not in msg
    assert classify_log(f"DiskFullError: {msg}") == DISK_FULL
    left = sorted(p.name for p in (tiny_disk / "checkpoints").iterdir())
    assert left == ["latest.pt"], left  # no temp file keeps the disk full
    assert torch.load(ck.latest_path, weights_only=False)["step"] == 1  # the old one intact


def test_training_on_a_full_disk_fails_with_the_disk_full_line(tiny_disk) -> None:
    """The real training process on a disk too small for its files: its log's cause line
    names the disk (not a serializer assertion), and the class is disk_full."""
    out = tiny_disk / "run"
    proc = subprocess.run(
        # ~0.7 MB per checkpoint
        LocalProcessResource().command(CELL, "demo", {"epochs": 2, "width_mult": 1.0}, out),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-2000:]
    assert classify_log(log) == DISK_FULL, log[-2000:]
    line = failure_line(log)
    assert "disk full" in line or "No space left on device" in line, line
    assert "enforce fail" not in line
