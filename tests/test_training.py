"""The training engine: metrics at their frequencies, resume, accumulation, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from deconflow.profiles import get_profile
from deconflow.protocol import FAMILIES
from deconflow.resources import LocalProcessResource
from deconflow.sweep import Cell
from deconflow.training.metrics_io import read_family
from deconflow.training.train import train

pytestmark = pytest.mark.slow  # trains demo runs

CELL = Cell("base", 0.1, 1e-3, 0)


def _frames(out: Path) -> dict[str, pd.DataFrame]:
    return {f: read_family(out, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / CELL.key
    return out, train(CELL, get_profile("demo"), out, log=lambda m: None)


def test_demo_run_logs_every_family_at_its_frequency(demo_run):
    out, summary = demo_run
    cfg = get_profile("demo")
    spe = summary["steps_per_epoch"]
    total = cfg.epochs * spe
    f = _frames(out)
    assert summary["outcome"] == "completed" and summary["steps"] == total
    assert list(f["batch_metrics"]["step"]) == list(range(1, total + 1))
    assert (f["batch_metrics"]["loss_bits"] * 0.6931471805599453).sub(
        f["batch_metrics"]["loss_nats"]
    ).abs().max() < 1e-9
    assert len(f["val_metrics"]) == cfg.epochs * cfg.val_per_epoch
    assert len(f["curvature_metrics"]) == total // cfg.hessian_every
    assert len(f["noise_metrics"]) == cfg.epochs // cfg.noise_every_epochs
    assert f["curvature_metrics"]["lambda_max"].gt(0).all()
    assert f["val_metrics"][["grad_norm", "weight_norm"]].gt(0).all().all()
    for fam in FAMILIES:
        assert (f[fam]["run_id"] == CELL.key).all()


def test_demo_run_learns(demo_run):
    out, summary = demo_run
    b = _frames(out)["batch_metrics"]
    first, last = b["loss_nats"].head(20).mean(), b["loss_nats"].tail(20).mean()
    assert last < 0.5 * first
    assert summary["final_val_accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert summary["best_val_ce"] < 1.0


def test_checkpoints_keep_best_three_and_latest(demo_run):
    out, _ = demo_run
    ck = out / "checkpoints"
    best = json.loads((ck / "best.json").read_text())
    assert len(best) == 3 and (ck / "latest.pt").exists()
    assert sorted(p.name for p in ck.glob("best-*.pt")) == sorted(b["file"] for b in best)
    val = _frames(out)["val_metrics"].sort_values("val_loss")
    assert [b["step"] for b in best] == list(val["step"].head(3))
    assert not list(ck.glob("*.tmp"))


def _start(out: Path, fault: str) -> subprocess.Popen:
    overrides = {"epochs": 5, "fault": fault, "heartbeat_every_s": 0}
    return subprocess.Popen(
        LocalProcessResource().command(CELL, "demo", overrides, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_killed_run_resumes_to_identical_metrics(tmp_path):
    cfg = get_profile("demo", epochs=5)  # 55 steps, latest.pt saved each 11
    ref = tmp_path / "ref"
    train(CELL, cfg, ref, log=lambda m: None)

    out = tmp_path / "killed"
    proc = _start(out, "hang@40")  # freezes at step 40, past the checkpoint at step 33
    deadline = time.time() + 120
    while time.time() < deadline:
        hb = out / "heartbeat.json"
        if hb.exists() and json.loads(hb.read_text())["step"] >= 39:
            break
        time.sleep(0.2)
    assert time.time() < deadline, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _frames(out)["batch_metrics"]
    assert partial["step"].max() == 33  # rows up to the last checkpoint

    summary = train(CELL, cfg, out, log=lambda m: None)
    assert summary["attempts"] == 2
    a, b = _frames(ref), _frames(out)
    for fam in FAMILIES:
        assert b[fam]["step"].is_unique, fam
        pd.testing.assert_frame_equal(a[fam], b[fam], check_exact=False, rtol=1e-6, atol=1e-7)


def test_grad_accumulation_keeps_the_effective_batch(tmp_path):
    # bn_off: without BatchNorm a 64-batch step equals two accumulated 32s exactly.
    cell = Cell("bn_off", 0.05, 1e-3, 1)
    cfg = get_profile("demo", epochs=1, hessian_every=0, noise_every_epochs=0)
    train(cell, cfg, tmp_path / "a", log=lambda m: None)
    train(cell, cfg.replace(grad_accum=2), tmp_path / "b", log=lambda m: None)
    a = _frames(tmp_path / "a")["batch_metrics"]
    b = _frames(tmp_path / "b")["batch_metrics"]
    pd.testing.assert_series_equal(a["loss_nats"], b["loss_nats"], rtol=1e-4, atol=1e-5)
    pd.testing.assert_series_equal(a["accuracy"], b["accuracy"])


def test_nan_loss_ends_run_as_diverged_and_keeps_metrics(tmp_path):
    cfg = get_profile("demo", epochs=4, fault="nan@30")
    s = train(CELL, cfg, tmp_path, log=lambda m: None)
    assert s["outcome"] == "diverged" and s["diverged_at_step"] == 30
    b = _frames(tmp_path)["batch_metrics"]
    assert list(b["step"]) == list(range(1, 31))
    assert b["loss_nats"].iloc[:-1].notna().all() and pd.isna(b["loss_nats"].iloc[-1])
    spe = s["steps_per_epoch"]
    before = {round(k * spe / 4) for k in range(1, 17)} & set(range(1, 30))
    assert len(_frames(tmp_path)["val_metrics"]) == len(before)  # validations before step 30
    assert json.loads((tmp_path / "summary.json").read_text())["outcome"] == "diverged"


def test_cifar_profile_trains_on_the_pickle_format(tmp_path):
    from tests.cifar_fixture import write_cifar_fixture

    folder = write_cifar_fixture(tmp_path / "cifar", n_per_batch=40)
    cfg = get_profile(
        "full",
        data_dir=str(folder),
        epochs=2,
        batch_size=50,
        width_mult=0.125,
        hessian_every=4,
        hessian_iters=2,
        hutchinson_samples=1,
        hessian_batch=16,
        noise_microbatches=2,
        warmup_epochs=1,
    )
    s = train(CELL, cfg, tmp_path / "run", log=lambda m: None)
    assert s["outcome"] == "completed" and s["steps"] == 8
    assert len(_frames(tmp_path / "run")["curvature_metrics"]) == 2


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deconflow.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variant", "resnet", "--lr", "0.1", "--wd", "0.001", "--seed", "0"], "unknown variant"),
        (["--variant", "base", "--lr", "0", "--wd", "0.001", "--seed", "0"], "learning rate"),
        (["--variant", "base", "--lr", "-1", "--wd", "0.001", "--seed", "0"], "learning rate"),
        (["--key", "base-lr0.1"], "malformed cell key"),
        (["--key", "base__lr0.1_wd0.001_s0;rm"], "malformed"),
        (["--key", "base__lr0.1_wd0.001_s0", "--profile", "huge"], "unknown profile"),
        (
            ["--key", "base__lr0.1_wd0.001_s0", "--profile", "full", "--data-dir", "/nope"],
            "CIFAR-10 folder not found: /nope",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    r = _cli("train", *args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_cli_grid_lists_216_cells(tmp_path):
    r = _cli("grid", cwd=tmp_path)
    assert r.returncode == 0
    keys = r.stdout.split()
    assert len(keys) == 216 == len(set(keys)) and "adamw__lr0.2_wd0.01_s5" in keys


def test_fast_path_settings_train_to_the_same_place(tmp_path):
    """channels_last + bf16 autocast (the GPU fast path) on CPU: same code, similar loss."""
    cfg = get_profile("demo", epochs=6, hessian_every=0, noise_every_epochs=0)
    plain = train(CELL, cfg, tmp_path / "plain", log=lambda m: None)
    fast = train(
        CELL, cfg.replace(channels_last=True, bf16=True), tmp_path / "fast", log=lambda m: None
    )
    assert fast["outcome"] == "completed" and fast["steps"] == plain["steps"]
    b = _frames(tmp_path / "fast")["batch_metrics"]
    assert b["loss_nats"].notna().all()
    assert fast["final_val_accuracy"] > 0.5
    assert abs(fast["best_val_ce"] - plain["best_val_ce"]) < 0.5
