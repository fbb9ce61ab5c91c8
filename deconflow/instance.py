"""The persistent Dagster home (``data/dagster_home`` unless ``DAGSTER_HOME`` is set)."""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from deconflow.settings import data_root


def ensure_dagster_home() -> Path:
    """Create the home with deconflow's dagster.yaml and export DAGSTER_HOME; returns it."""
    home = Path(os.environ.get("DAGSTER_HOME") or data_root() / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    yaml = home / "dagster.yaml"
    if not yaml.exists():
        src = resources.files("deconflow") / "dagster_home" / "dagster.yaml"
        shutil.copyfile(str(src), yaml)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
