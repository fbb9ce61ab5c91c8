"""ARCHITECTURE.md holds: every module is named there, the orchestrator never imports torch,
and imports flow one way (grid -> training -> warehouse -> analysis assets)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("deconflow", "deconflow_dev")

# Rooms of the runtime package and what each may import of deconflow. The base room is
# the shared vocabulary (names, settings, the grid, atomic files); everything may use it.
BASE = {
    "keys",
    "protocol",
    "settings",
    "sweep",
    "profiles",
    "schedule",
    "atomic",
    "parquet_io",
    "procs",
    "failures",
    "datadict",
    "attempt_lock",
}
MAY_IMPORT = {
    "base": BASE,
    "analysis": BASE | {"analysis"},
    "training": BASE | {"analysis", "training"},
    "warehouse": BASE | {"analysis", "warehouse"},
    "slurm": BASE | {"slurm"},
}
# Third-party imports a room must never make (torch only in training; Dagster nowhere below
# the orchestrator, except the training's Pipes client).
FORBIDDEN = {
    "base": {"torch", "dagster", "dagster_pipes"},
    "analysis": {"torch", "dagster", "dagster_pipes"},
    "training": {"dagster"},
    "warehouse": {"torch", "dagster", "dagster_pipes"},
    "slurm": {"torch", "dagster", "dagster_pipes"},
}


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def room_of(path: Path) -> str | None:
    rel = path.relative_to(REPO / "deconflow") if path.is_relative_to(REPO / "deconflow") else None
    if rel is None:
        return None
    if len(rel.parts) == 1:
        return "base" if rel.stem in BASE else None
    return rel.parts[0] if rel.parts[0] in MAY_IMPORT else None


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_architecture_names_every_module():
    text = (REPO / "ARCHITECTURE.md").read_text()
    missing = []
    for path in modules():
        rel = path.relative_to(REPO).as_posix()
        if path.name == "__init__.py":
            continue
        # Named by its path (from the repo or its package), or as a dotted module.
        dotted = rel[:-3].replace("/", ".")
        in_package = rel.split("/", 1)[1]
        if not any(f"`{name}`" in text for name in (rel, in_package)) and dotted not in text:
            missing.append(rel)
    assert not missing, f"ARCHITECTURE.md does not name: {missing}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_imports_flow_one_way(path):
    room = room_of(path)
    if room is None:
        return  # orchestrator side: assets, sensors, resources, cli; checked for torch below
    allowed, forbidden = MAY_IMPORT[room], FORBIDDEN[room]
    bad = []
    for name in imports_of(path):
        top, *rest = name.split(".")
        if top == "deconflow" and rest:
            target = rest[0]
            if target not in allowed and target not in {"__init__"}:
                bad.append(name)
        elif top in forbidden:
            bad.append(name)
    assert not bad, f"{path.relative_to(REPO)} ({room}) imports {sorted(bad)}"


ORCHESTRATOR_ENTRIES = [
    "deconflow.definitions",
    "deconflow.cli",
    "deconflow.materialize",
    "deconflow.status",
    "deconflow.warehouse.tables",
    "deconflow.warehouse.database",
]


def test_the_orchestrator_never_imports_torch():
    code = (
        "import importlib, sys\n"
        f"for m in {ORCHESTRATOR_ENTRIES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m == 'torch' or m.startswith('deconflow.training'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "", f"the orchestrator side imports {out.stdout.strip()}"
