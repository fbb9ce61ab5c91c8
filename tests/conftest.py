"""Shared fixtures: a private data folder and Dagster home per test module."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest
import torch

# One local SLURM cluster for the whole session, wherever tests point DECONFLOW_DATA.
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DECONFLOW_SLURM_DIR", str(REPO / "data" / "slurm"))

# One torch thread: tests share 2 cores with training subprocesses, and oversubscribed
# OpenMP threads make small models many times slower.
os.environ.setdefault("DECONFLOW_TORCH_THREADS", "1")
torch.set_num_threads(int(os.environ["DECONFLOW_TORCH_THREADS"]))

# Small demo runs: 4 epochs of 11 steps, every monitor still fires.
SMALL = {"epochs": 4}


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory, request):
    """DECONFLOW_DATA and DAGSTER_HOME in a temp folder for the module; restored after."""
    root = tmp_path_factory.mktemp("sweep")
    old = {k: os.environ.get(k) for k in ("DECONFLOW_DATA", "DAGSTER_HOME", "DECONFLOW_DB")}
    os.environ["DECONFLOW_DATA"] = str(root / "data")
    os.environ["DAGSTER_HOME"] = str(root / "data" / "dagster_home")
    os.environ.pop("DECONFLOW_DB", None)
    from deconflow.instance import ensure_dagster_home

    ensure_dagster_home()
    yield root / "data"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_defs(**overrides):
    from deconflow.definitions import build_definitions
    from deconflow.resources import LocalProcessResource, SweepSettings

    return build_definitions(
        resources={
            "compute": LocalProcessResource(),
            "sweep": SweepSettings(
                profile="demo", overrides_json=json.dumps({**SMALL, **overrides})
            ),
        }
    )


def asset(defs: dg.Definitions, name: str) -> dg.AssetsDefinition:
    return defs.get_repository_def().assets_defs_by_key[dg.AssetKey(name)]


def downstream(defs: dg.Definitions) -> list:
    repo = defs.get_repository_def()
    assets = [a for k, a in repo.assets_defs_by_key.items() if k.to_user_string() != "training_run"]
    return assets + list(repo.asset_checks_defs_by_key.values())


def data_path(*parts: str) -> Path:
    return Path(os.environ["DECONFLOW_DATA"]).joinpath(*parts)
