"""Issue 23 (and 20): metric writes are O(new rows), one reader, bounded best checkpoints,
and a full disk during a metrics write is the disk_full class.

The full disk is a real 1 MiB tmpfs (root only; skipped elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pandas as pd
import pytest

from deconflow.failures import DISK_FULL, classify_log, failure_line
from deconflow.profiles import get_profile
from deconflow.protocol import FAMILIES, family_file, family_parts_dir
from deconflow.sweep import Cell
from deconflow.training import checkpoints as ckmod
from deconflow.training.checkpoints import DiskFullError
from deconflow.training.metrics_io import MetricLog, read_family
from deconflow.training.train import train

CELL = Cell("base", 0.1, 1e-3, 0)


def _batch_rows(log: MetricLog, a: int, b: int) -> None:
    steps = list(range(a, b))
    log.extend(
        "batch_metrics",
        {c: steps if c == "step" else [float(s) for s in steps] for c in FAMILIES["batch_metrics"]},
    )


def _part_rows(folder: Path, family: str) -> list[int]:
    d = folder / family_parts_dir(family)
    return [len(pd.read_parquet(p)) for p in sorted(d.glob("part-*.parquet"))]


def test_each_flush_writes_only_the_new_rows(tmp_path) -> None:
    log = MetricLog(tmp_path, "r")
    for k in range(4):
        _batch_rows(log, 1 + 10 * k, 11 + 10 * k)
        log.flush()
    log.flush()  # nothing new: no file
    assert _part_rows(tmp_path, "batch_metrics") == [10, 10, 10, 10]
    assert not (tmp_path / family_file("batch_metrics")).exists()
    view = read_family(tmp_path, "batch_metrics")
    assert list(view["step"]) == list(range(1, 41)) and (view["run_id"] == "r").all()
    log.compact()
    assert not (tmp_path / family_parts_dir("batch_metrics")).exists()
    whole = pd.read_parquet(tmp_path / family_file("batch_metrics"))
    pd.testing.assert_frame_equal(whole, view)
    pd.testing.assert_frame_equal(whole, log.frame("batch_metrics"), check_dtype=False)
    for fam in FAMILIES:  # every family has its single file, empty ones included
        assert (tmp_path / family_file(fam)).exists()


def test_resume_drops_rows_past_the_checkpoint_and_appends_after_them(tmp_path) -> None:
    log = MetricLog(tmp_path, "r")
    _batch_rows(log, 1, 21)
    log.flush()
    _batch_rows(log, 21, 31)
    log.flush()  # a crash after this: the checkpoint was at step 25
    again = MetricLog(tmp_path, "r")
    again.load(upto_step=25)
    assert [r["step"] for r in again.rows["batch_metrics"]] == list(range(1, 26))
    assert list(read_family(tmp_path, "batch_metrics")["step"]) == list(range(1, 26))
    _batch_rows(again, 26, 36)
    again.flush()
    assert _part_rows(tmp_path, "batch_metrics") == [10]  # the new rows only
    assert list(read_family(tmp_path, "batch_metrics")["step"]) == list(range(1, 36))


def test_the_reader_keeps_the_newest_write_of_a_step(tmp_path) -> None:
    """A resume killed between rewriting its base file and removing the old parts leaves
    both: the view still has each step once, from the newest write."""
    log = MetricLog(tmp_path, "r")
    _batch_rows(log, 1, 11)
    log.flush()
    base = log.frame("batch_metrics")
    base["loss_nats"] = -1.0
    base.to_parquet(tmp_path / family_file("batch_metrics"), index=False)
    view = read_family(tmp_path, "batch_metrics")
    assert view["step"].is_unique and len(view) == 10
    assert (view["loss_nats"] >= 1).all()  # from the part, written after the base
    assert list(read_family(tmp_path, "noise_metrics").columns) == [
        "run_id",
        *FAMILIES["noise_metrics"],
    ]


@pytest.mark.slow
def test_a_finished_run_folder_has_one_file_per_family_and_no_parts(tmp_path) -> None:
    out = tmp_path / "run"
    train(CELL, get_profile("demo", epochs=2, hessian_every=8), out, log=lambda m: None)
    for fam in FAMILIES:
        assert (out / family_file(fam)).exists(), fam
        assert not (out / family_parts_dir(fam)).exists(), fam
    assert list(pd.read_parquet(out / "batch_metrics.parquet")["step"]) == list(range(1, 23))


@pytest.mark.slow
def test_best_checkpoints_are_written_only_with_the_latest(tmp_path, monkeypatch) -> None:
    """At most one best-checkpoint write per checkpoint interval (once per epoch here),
    still the best 3 by validation loss plus the latest."""
    writes: list[str] = []
    real = ckmod.Checkpoints._write

    def spy(self, path, obj):
        writes.append(Path(path).name)
        return real(self, path, obj)

    monkeypatch.setattr(ckmod.Checkpoints, "_write", spy)
    out = tmp_path / "run"
    cfg = get_profile("demo", epochs=4, hessian_every=0, noise_every_epochs=0)
    train(CELL, cfg, out, log=lambda m: None)
    # writes come in groups: the best ones held since the last latest, then the latest
    groups, cur = [], []
    for w in writes:
        cur.append(w)
        if w == ".latest.next.pt":
            groups.append(cur)
            cur = []
    assert not cur and len(groups) == cfg.epochs  # one latest per epoch, nothing after
    for g in groups:
        assert len(g) - 1 <= 3, g  # at most the k best, each written once
    val = read_family(out, "val_metrics").sort_values(["val_loss", "step"])
    ck = out / "checkpoints"
    best = sorted(p.name for p in ck.glob("best-*.pt"))
    assert best == sorted(f"best-{s:07d}.pt" for s in val["step"].head(3))
    assert (ck / "latest.pt").exists()


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


def _fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte (unbuffered writes until ENOSPC)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_disk_full_during_a_metrics_write_is_one_line_naming_the_file(tiny_disk) -> None:
    run = tiny_disk / "run"
    run.mkdir()
    log = MetricLog(run, CELL.key)
    _batch_rows(log, 1, 11)
    log.flush()  # fits
    _fill(tiny_disk)
    _batch_rows(log, 11, 5000)
    with pytest.raises(DiskFullError) as e:
        log.flush()
    msg = str(e.value)
    part = run / family_parts_dir("batch_metrics") / "part-000001.parquet"
    assert msg.startswith(f"disk full: cannot write {part}"), msg
    assert "MiB free" in msg and "\n" not in msg
    assert classify_log(f"deconflow.training.checkpoints.DiskFullError: {msg}") == DISK_FULL
    assert sorted(p.name for p in part.parent.iterdir()) == ["part-000000.parquet"]  # no temp
    assert list(read_family(run, "batch_metrics")["step"]) == list(range(1, 11))


def test_training_whose_metrics_fill_the_disk_fails_as_disk_full(tiny_disk, monkeypatch) -> None:
    """The real training loop on a real full disk, the metrics write the one that fails:
    one DiskFullError line naming the metrics file, classified disk_full."""
    out = tiny_disk / "run"
    real = MetricLog.flush

    def fill_then_flush(self):
        if not (tiny_disk / "filler").exists():
            _fill(tiny_disk)  # the disk fills up just before the run's first metrics write
        return real(self)

    monkeypatch.setattr(MetricLog, "flush", fill_then_flush)
    cfg = get_profile("demo", epochs=2, hessian_every=0, noise_every_epochs=0)
    with pytest.raises(DiskFullError) as e:
        train(CELL, cfg, out, log=lambda m: None)
    line = f"{type(e.value).__module__}.{type(e.value).__name__}: {e.value}"
    assert "_metrics.parts/part-000000.parquet" in line, line
    assert classify_log(line) == DISK_FULL
    assert failure_line(line).startswith(
        "deconflow.training.checkpoints.DiskFullError: disk full: cannot write "
    )
