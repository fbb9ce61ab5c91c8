"""Shared fixtures: a private data folder and Dagster home per test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import slurm_test_lock

# One local SLURM cluster for the whole session, wherever tests point DECONFLOW_DATA.
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DECONFLOW_SLURM_DIR", str(REPO / "data" / "slurm"))
# Its node advertises room for the tests of 6 xdist workers at once: SLURM only schedules
# (the fake GPUs are /dev/null), so the jobs of one test never wait for another's.
os.environ.setdefault("DECONFLOW_SLURM_CPUS", "24")
os.environ.setdefault("DECONFLOW_SLURM_GPUS", "12")
os.environ.setdefault("DECONFLOW_SLURM_SHARDS", "24")

# One torch thread: tests share 2 cores with training subprocesses, and oversubscribed
# OpenMP threads make small models many times slower.
os.environ.setdefault("DECONFLOW_TORCH_THREADS", "1")
torch.set_num_threads(int(os.environ["DECONFLOW_TORCH_THREADS"]))


# Fixtures that start a service: a test that uses one is slow.
SERVICE_FIXTURES = {"postgres_server", "pg_dagster_home", "slurm_cluster", "slurm"}
SLURM_FIXTURES = {"slurm_cluster", "slurm"}
# Module-scoped fixtures that cost nothing to set up again (the rest train or start things:
# their module's tests stay on one xdist worker, so the fixture runs once).
CHEAP_MODULE_FIXTURES = {"sweep_env", "slurm", "slurm_cluster"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & SERVICE_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if used & SLURM_FIXTURES:
            item.add_marker(pytest.mark.slurm)
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs if info else {}
        costly = [
            name
            for name, fd in defs.items()
            if name not in CHEAP_MODULE_FIXTURES and fd and fd[-1].scope == "module"
        ]
        if costly:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    _longest_first(items)


# The modules whose tests take minutes, longest first. Parallel workers take tests in
# collection order, so these start at once instead of stretching the end of the run.
LONG_MODULES = (
    "test_doc_commands",
    "test_restart",
    "test_queue_restart",
    "test_concurrency",
    "test_faults",
    "test_live",
    "test_duckdb_safety",
)


def _longest_first(items: list) -> None:
    """Reorder whole modules (their module fixtures still run once): the long ones, then
    the other modules with slow tests, then the rest; otherwise the order stays."""

    def rank(item) -> int:
        name = item.module.__name__.rpartition(".")[2]
        if name in LONG_MODULES:
            return LONG_MODULES.index(name)
        return len(LONG_MODULES) + (0 if slow_modules.get(name) else 1)

    slow_modules: dict[str, bool] = {}
    for item in items:
        name = item.module.__name__.rpartition(".")[2]
        slow_modules[name] = slow_modules.get(name, False) or bool(item.get_closest_marker("slow"))
    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _share_the_slurm_cluster(request):
    """Tests on the one dev cluster run side by side (shared lock); a test marked
    ``slurm_exclusive`` (it stops or restarts daemons) waits for them and runs alone."""
    if request.node.get_closest_marker("slurm") is None:
        yield
        return
    exclusive = request.node.get_closest_marker("slurm_exclusive") is not None
    with slurm_test_lock(exclusive):
        yield


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory, request):
    """DECONFLOW_DATA and DAGSTER_HOME in a temp folder for the module; restored after."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DECONFLOW_DATA", str(root / "data"))
        mp.setenv("DAGSTER_HOME", str(root / "data" / "dagster_home"))
        mp.delenv("DECONFLOW_DB", raising=False)
        from deconflow.instance import ensure_dagster_home

        ensure_dagster_home()
        yield root / "data"


@pytest.fixture
def instance(tmp_path, monkeypatch):
    """A temporary Dagster instance, with DECONFLOW_DATA in the test's own folder."""
    import dagster as dg

    monkeypatch.setenv("DECONFLOW_DATA", str(tmp_path / "data"))
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as inst:
        yield inst


@pytest.fixture(scope="session")
def postgres_server():
    """The local PostgreSQL server (Debian's package), started once for the session."""
    from deconflow_dev import postgres

    return postgres.up(postgres.default_state_dir())


@pytest.fixture
def pg_dagster_home(postgres_server, tmp_path, monkeypatch):
    """A Dagster home whose instance lives in a fresh PostgreSQL database (production storage)."""
    import uuid

    from deconflow.instance import ensure_dagster_home
    from deconflow_dev import postgres

    url = postgres.reset_database(postgres_server, f"dcf_test_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("DECONFLOW_PG_URL", url)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return ensure_dagster_home()


@pytest.fixture(scope="module")
def slurm_cluster():
    # Resolve the state dir before any test points DECONFLOW_DATA elsewhere.
    from deconflow_dev import slurm_cluster as cluster

    info = cluster.up(cluster.default_state_dir())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(info.slurm_conf))
        yield info
