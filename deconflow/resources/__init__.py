"""Compute (local process or SLURM), sweep settings; chosen by environment, no code edits."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from deconflow.resources.compute import ComputeResource, LocalProcessResource
from deconflow.resources.sweep_settings import SweepSettings


def compute_from_env() -> ComputeResource:
    """``DECONFLOW_COMPUTE=local`` (default) or ``slurm``; SLURM settings come from the
    TOML file named by ``DECONFLOW_SLURM_CONFIG`` (see README, "Running on a cluster")."""
    kind = os.environ.get("DECONFLOW_COMPUTE", "local")
    if kind == "local":
        return LocalProcessResource()
    if kind == "slurm":
        from deconflow.resources.slurm import SlurmResource

        cfg_path = os.environ.get("DECONFLOW_SLURM_CONFIG")
        cfg = tomllib.loads(Path(cfg_path).read_text()) if cfg_path else {}
        return SlurmResource(**cfg.get("slurm", cfg))
    raise ValueError(f"DECONFLOW_COMPUTE must be 'local' or 'slurm', got {kind!r}")


def sweep_from_env() -> SweepSettings:
    return SweepSettings(
        profile=os.environ.get("DECONFLOW_PROFILE", "demo"),
        overrides_json=os.environ.get("DECONFLOW_TRAIN_OVERRIDES", "{}"),
    )


__all__ = [
    "ComputeResource",
    "LocalProcessResource",
    "SweepSettings",
    "compute_from_env",
    "sweep_from_env",
]
