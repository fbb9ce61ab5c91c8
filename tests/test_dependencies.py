"""Dependencies pinned to what is tested, and public Dagster APIs only."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DEPS = [
    Requirement(r)
    for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
]
# Private Dagster imports with no public equivalent: the latest-run-per-partition queries
# read the run storage's SQL tables directly (one query instead of one per partition);
# Dagster's public API (instance.get_runs) has no group-by.
PRIVATE_OK = {"deconflow/sensors/watchdog.py", "deconflow/sensors/run_index.py"}


@pytest.mark.parametrize("req", DEPS, ids=str)
def test_installed_versions_satisfy_the_pins(req):
    try:
        have = version(req.name)
    except PackageNotFoundError:
        pytest.skip(f"{req.name} is not installed")
    assert req.specifier.contains(have, prereleases=True), f"{req.name} {have} not in {req}"


def test_pins_are_tight_where_the_code_depends_on_them():
    spec = {r.name: str(r.specifier) for r in DEPS}
    for name in ("dagster", "dagster-webserver", "dagster-pipes"):
        assert spec[name] == "<1.14,>=1.13", (name, spec[name])
    assert spec["duckdb"] == "<2.1,>=2.0.1"
    assert "duckdb-cli" in spec  # the documented `duckdb` command


def test_public_dagster_apis_only():
    private = set()
    for p in sorted((REPO / "deconflow").rglob("*.py")):
        if re.search(r"\bdagster\._", p.read_text()):
            private.add(p.relative_to(REPO).as_posix())
    assert private <= PRIVATE_OK, sorted(private - PRIVATE_OK)
