"""The SLURM queue depth and the one list of SLURM job fields (fast: no cluster, no services).

With the SLURM resource, training runs in flight = slots + queue depth, so the next cells' jobs
wait PENDING in SLURM's queue; the local resource keeps exactly its slots. A bad depth is a
one-line error naming the setting, and nothing is submitted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import pytest
import yaml

from deconflow.instance import render_dagster_yaml, training_runs_limit
from deconflow.resources.slurm import SlurmResource, job_option_fields
from deconflow.slurm.queue import QUEUE_DEPTH_ENV, slurm_queue_depth
from deconflow.slurm.script import JobOptions, SlurmConfigError

REPO = Path(__file__).resolve().parents[1]


def _training_limit(text: str) -> int:
    runs = yaml.safe_load(text)["concurrency"]["runs"]
    (limit,) = [t["limit"] for t in runs["tag_concurrency_limits"]]
    return limit


@pytest.mark.parametrize(
    "compute, slots, depth, expected",
    [
        ("slurm", "2", None, 4),  # default: one waiting job per slot
        ("slurm", "40", None, 56),  # default capped at 16
        ("slurm", "2", "5", 7),
        ("slurm", "2", "0", 2),  # 0: Dagster's run queue waits, as before
        ("local", "2", "5", 2),  # the local resource keeps its slots
        (None, "3", None, 3),
    ],
)
def test_training_runs_in_flight_are_slots_plus_queue_depth(
    monkeypatch, compute, slots, depth, expected
) -> None:
    for name, value in (
        ("DECONFLOW_COMPUTE", compute),
        ("DECONFLOW_TRAINING_SLOTS", slots),
        (QUEUE_DEPTH_ENV, depth),
    ):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("DECONFLOW_PG_URL", raising=False)
    text = render_dagster_yaml()
    assert _training_limit(text) == expected
    runs = yaml.safe_load(text)["concurrency"]["runs"]
    assert runs["max_concurrent_runs"] == expected + 2  # + the analysis slots
    assert sum(training_runs_limit()) == expected


@pytest.mark.parametrize("raw", ["-1", "abc", "2.5", "1e3"])
def test_a_bad_queue_depth_is_one_line_naming_the_setting(monkeypatch, raw) -> None:
    monkeypatch.setenv(QUEUE_DEPTH_ENV, raw)
    with pytest.raises(SlurmConfigError) as e:
        slurm_queue_depth(2)
    msg = str(e.value)
    assert QUEUE_DEPTH_ENV in msg and "\n" not in msg and raw.lstrip("-") in msg
    # The resource refuses it too, before anything is submitted (setup_for_execution).
    with pytest.raises(SlurmConfigError, match=QUEUE_DEPTH_ENV):
        SlurmResource().check_config()
    monkeypatch.setenv("DECONFLOW_COMPUTE", "slurm")
    with pytest.raises(SlurmConfigError, match=QUEUE_DEPTH_ENV):
        render_dagster_yaml()


def test_materialize_with_a_bad_queue_depth_submits_nothing(tmp_path) -> None:
    """`deconflow materialize` on SLURM with DECONFLOW_SLURM_QUEUE_DEPTH=-3: exit 2, one line
    naming the setting, and no sbatch ever ran (a fake sbatch first on PATH records calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("sbatch", "squeue", "sacct", "scontrol", "scancel"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
        script.chmod(0o755)
    (tmp_path / "slurm.toml").write_text('[slurm]\npartition = "gpu"\n')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DECONFLOW_COMPUTE": "slurm",
        "DECONFLOW_SLURM_CONFIG": str(tmp_path / "slurm.toml"),
        QUEUE_DEPTH_ENV: "-3",
        "DECONFLOW_DATA": str(tmp_path / "data"),
        "DAGSTER_HOME": str(tmp_path / "home"),
    }
    env.pop("DECONFLOW_PG_URL", None)
    r = subprocess.run(
        [sys.executable, "-m", "deconflow.cli", "materialize", "--key", "base__lr0.1_wd0.001_s0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and QUEUE_DEPTH_ENV in lines[0], r.stderr
    assert not calls.exists() or "sbatch" not in calls.read_text()
    assert "materializing" not in r.stdout


def test_every_job_option_is_a_resource_setting() -> None:
    """JobOptions is the one list of SLURM job fields: each is a SlurmResource field with the
    same default, and options() carries every one of them through."""
    model = SlurmResource.model_fields
    for f in fields(JobOptions):
        assert f.name in model, f.name
        default = f.default if f.default is not MISSING else f.default_factory()
        assert SlurmResource().__getattribute__(f.name) == default
    values = {"partition": "gpu", "mem": "4G", "setup_lines": ["module load x"], "qos": "hi"}
    assert SlurmResource(**values).options() == JobOptions(**values)


def test_a_field_added_to_job_options_reaches_the_resource() -> None:
    @dataclass
    class MoreOptions(JobOptions):
        reservation: str | None = None
        nice: int = 0

    base = job_option_fields(MoreOptions)

    class Resource(base):  # what SlurmResource is to JobOptions
        def launch(self, *a): ...
        def wait(self, *a): ...
        def cancel(self, *a): ...
        def cancel_run_job(self, tags): ...

    r = Resource(reservation="maint", nice=5, partition="gpu")
    assert (r.reservation, r.nice, r.partition) == ("maint", 5, "gpu")
    assert {f.name for f in fields(MoreOptions)} <= set(Resource.model_fields)
    with pytest.raises(ValueError):  # pydantic validates the type
        Resource(nice="not a number")


def test_the_default_queue_depth(monkeypatch) -> None:
    monkeypatch.delenv(QUEUE_DEPTH_ENV, raising=False)
    assert [slurm_queue_depth(n) for n in (1, 2, 16, 128)] == [1, 2, 16, 16]
    monkeypatch.setenv(QUEUE_DEPTH_ENV, " 7 ")
    assert slurm_queue_depth(2) == 7


def test_bad_queue_depth_error_type_is_a_value_error() -> None:
    assert issubclass(SlurmConfigError, ValueError)


def test_materialize_adds_the_depth_on_slurm_only(monkeypatch) -> None:
    from deconflow.materialize import _queue_depth

    monkeypatch.setenv(QUEUE_DEPTH_ENV, "3")
    monkeypatch.setenv("DECONFLOW_COMPUTE", "local")
    assert _queue_depth(2) == 0
    monkeypatch.setenv("DECONFLOW_COMPUTE", "slurm")
    assert _queue_depth(2) == 3
