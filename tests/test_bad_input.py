"""Bad input: every case is a one-line error (exit status 2) before anything is written.

Each CLI case runs the real `deconflow` command in a fresh folder with DECONFLOW_DATA pointing
into it, then checks that the folder is still empty: no data folder, no Dagster home, no run
folder, no empty output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deconflow.profiles import get_profile
from deconflow.resources import slurm_from_file
from deconflow.slurm.script import JobOptions, SlurmConfigError
from deconflow.sweep import GridError, grid_from_dict, load_grid

REPO = Path(__file__).resolve().parents[1]
KEY = "base__lr0.1_wd0.001_s0"
GOOD = {"variants": ["base"], "lr": [0.1], "weight_decay": [0.001], "seed": [0]}


def _run(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "DECONFLOW_DATA": str(tmp / "data"),
        "DAGSTER_HOME": str(tmp / "data" / "dagster_home"),
        "PYTHONPATH": str(REPO),
        **env,
    }
    for k in ("DECONFLOW_COMPUTE", "DECONFLOW_SLURM_CONFIG", "DECONFLOW_TRAIN_OVERRIDES"):
        if k not in env:
            full.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "deconflow.cli", *args],
        cwd=tmp,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_nothing_written(r: subprocess.CompletedProcess, tmp: Path, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("deconflow: error: ") and message in err, err
    written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.name != "inputs")
    assert [w for w in written if not w.startswith("inputs")] == [], written


def _grid_file(tmp: Path, text: str) -> Path:
    (tmp / "inputs").mkdir(exist_ok=True)
    p = tmp / "inputs" / "grid.toml"
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- the grid file

GRID_CASES = [
    ('lr = ["abc"]', "'lr' must hold numbers only, got 'abc'"),
    ("lr = [[0.1]]", "'lr' must hold numbers only, got [0.1]"),
    ("lr = [true]", "'lr' must hold numbers only, got True (bool)"),
    ('lr = ["0.4"]', "'lr' must hold numbers only, got '0.4' (str)"),
    ("seed = [0.5]", "'seed' must hold integers only"),
    ("seed = [true]", "'seed' must hold integers only"),
    ("seeds = [6]", "unknown grid field(s) 'seeds' (did you mean 'seed'?)"),
]


def _toml(override: str) -> str:
    fields = {
        "variants": '["base", "adamw"]',
        "lr": "[0.1, 0.2]",
        "weight_decay": "[0.001]",
        "seed": "[0, 1]",
    }
    key = override.split("=")[0].strip()
    lines = [f"{k} = {v}" for k, v in fields.items() if k != key]
    return "\n".join([*lines, override]) + "\n"


@pytest.mark.parametrize("override, message", GRID_CASES)
def test_grid_values_are_typed_and_keys_known(tmp_path, override, message) -> None:
    path = _grid_file(tmp_path, _toml(override))
    with pytest.raises(GridError, match=None) as e:
        load_grid(path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # runs the deconflow command in a subprocess
def test_bad_grid_through_the_commands(tmp_path) -> None:
    path = _grid_file(tmp_path, _toml("lr = [true]"))
    r = _run(tmp_path, "grid", "--grid", str(path))
    _one_line_nothing_written(r, tmp_path, "must hold numbers only, got True")
    r = _run(tmp_path, "materialize", "--no-analysis", DECONFLOW_GRID=str(path))
    _one_line_nothing_written(r, tmp_path, "must hold numbers only, got True")


def test_good_grid_values_still_load() -> None:
    grid = grid_from_dict({**GOOD, "lr": [0.1, 1], "name": "mine"})
    assert grid.lrs == (0.1, 1.0) and grid.name == "mine"
    assert len(load_grid()) == 216


# --------------------------------------------------------------------------- the commands


@pytest.mark.slow  # runs the deconflow command in a subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        (["--key", KEY, "--device", "tpu"], "unknown device 'tpu'"),
        (["--key", KEY, "--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--key", KEY, "--epochs", "-3"], "epochs must be an integer >= 1, got -3"),
        (["--key", KEY, "--grad-accum", "0"], "must be a positive multiple of grad_accum (0)"),
    ],
)
def test_train_bad_settings(tmp_path, args, message) -> None:
    # No --out: the default (the work folder, then publishing) must not be created either.
    r = _run(tmp_path, "train", *args)
    _one_line_nothing_written(r, tmp_path, message)
    r = _run(tmp_path, "train", *args, "--out", str(tmp_path / "out"))
    _one_line_nothing_written(r, tmp_path, message)


@pytest.mark.slow  # runs the deconflow command in a subprocess
@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--key", "base__lr0.4_wd0.001_s0"], {}, "not in the grid loss-slope-sweep"),
        (["--key", "base__lr0.1_wd0.001_s9"], {}, "base__lr0.1_wd0.001_s9"),
        (["--key", KEY, "--workers", "0"], {}, "--workers must be >= 1, got 0"),
        (
            ["--key", KEY],
            {"DECONFLOW_TRAIN_OVERRIDES": json.dumps({"checkpoint_every": 0})},
            "checkpoint_every must be an integer >= 1, got 0",
        ),
        (
            ["--key", KEY],
            {"DECONFLOW_TRAIN_OVERRIDES": json.dumps({"epoch": 3})},
            "unknown training setting 'epoch'",
        ),
        (["--key", KEY], {"DECONFLOW_COMPUTE": "k8s"}, "DECONFLOW_COMPUTE must be"),
    ],
)
def test_materialize_bad_input(tmp_path, args, env, message) -> None:
    r = _run(tmp_path, "materialize", "--no-analysis", *args, **env)
    _one_line_nothing_written(r, tmp_path, message)


@pytest.mark.slow  # runs the deconflow command in a subprocess
def test_demo_bad_workers(tmp_path) -> None:
    _one_line_nothing_written(_run(tmp_path, "demo", "--workers", "0"), tmp_path, "--workers")


def test_checkpoint_every_zero_is_refused_before_a_run_starts() -> None:
    # It used to be accepted and divide by zero at the first validation point, mid-run.
    with pytest.raises(GridError, match="checkpoint_every must be an integer >= 1, got 0"):
        get_profile("demo", checkpoint_every=0)
    for bad in ({"val_per_epoch": 0}, {"keep_best": 0}, {"width_mult": 0.0}, {"epochs": True}):
        with pytest.raises(GridError):
            get_profile("demo", **bad)


# --------------------------------------------------------------------------- SLURM settings


def _slurm_toml(tmp: Path, text: str) -> Path:
    (tmp / "inputs").mkdir(exist_ok=True)
    p = tmp / "inputs" / "slurm.toml"
    p.write_text(text)
    return p


@pytest.mark.slow  # runs the deconflow command in a subprocess
@pytest.mark.parametrize(
    "text, message",
    [
        ('[slurm]\npartiton = "gpu"\n', "unknown SLURM setting(s) 'partiton' (did you mean "),
        ('partition = "gpu"\ngpus_per_jobs = 2\n', "(did you mean 'gpus_per_job'?)"),
        ('[slurm]\npartition = "gpu"\n[other]\nx = 1\n', "unknown top-level key(s) 'other'"),
        ('[slurm]\ngpus_per_job = "two"\n', "invalid SLURM setting gpus_per_job = 'two'"),
        ('[slurm]\npartition = "gpu;rm -rf ~"\n', "invalid SlurmResource.partition"),
        ("[slurm\n", "is not valid TOML"),
        (
            '[slurm]\nextra_sbatch_lines = ["--output=/tmp/x.log"]\n',
            "sets --output, which deconflow owns",
        ),
    ],
)
def test_slurm_settings_are_checked_whole(tmp_path, text, message) -> None:
    path = _slurm_toml(tmp_path, text)
    with pytest.raises(SlurmConfigError) as e:
        slurm_from_file(path)
    assert message in str(e.value) and str(path) in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    r = _run(
        tmp_path,
        "materialize",
        "--key",
        KEY,
        DECONFLOW_COMPUTE="slurm",
        DECONFLOW_SLURM_CONFIG=str(path),
    )
    _one_line_nothing_written(r, tmp_path, message)


def test_partiton_typo_names_the_close_match(tmp_path) -> None:
    path = _slurm_toml(tmp_path, '[slurm]\npartiton = "gpu"\n')
    with pytest.raises(SlurmConfigError, match="did you mean 'partition'"):
        slurm_from_file(path)


@pytest.mark.parametrize(
    "line",
    [
        "--output=/tmp/x.log",
        "--output /tmp/x.log",
        "-o /tmp/x.log",
        "-o/tmp/x.log",
        "--out=/tmp/x.log",  # sbatch takes unambiguous prefixes of long options
        "--error=/tmp/e.log",
        "-e /tmp/e.log",
        "--chdir=/tmp",
        "-D /tmp",
        "--job-name=mine",
        "-J mine",
        "--open-mode=truncate",
        "--array=0-3",
        "#SBATCH --output=/tmp/x.log",
    ],
)
def test_sbatch_lines_that_would_move_the_log_are_refused(line) -> None:
    with pytest.raises(SlurmConfigError, match="which deconflow owns"):
        JobOptions(extra_sbatch_lines=[line]).check()


@pytest.mark.parametrize(
    "line", ["--constraint=rtx8000", "--exclude=node13", "--exclusive", "--mail-type=END"]
)
def test_other_sbatch_lines_still_pass(line) -> None:
    JobOptions(extra_sbatch_lines=[line]).check()
