"""Settings in one typed module: every DECONFLOW_* variable known to deconflow/settings.py,
read only there (and by the dev tools), a one-line error naming it for every bad value, and
docs/configuration.md generated from the same table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deconflow import settings
from deconflow.settings import SETTINGS, SettingError

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"DECONFLOW_[A-Z0-9_]*[A-Z0-9]")
# A read of the environment with a DECONFLOW_ name, or one held in a ``*_VAR`` constant (a
# write, e.g. setdefault or a child's env dict, is not a read). Dagster's own Pipes variables
# (``DAGSTER_PIPES_*_ENV_VAR``, read by the training process) are not settings.
READ = re.compile(
    r"""(os\.environ\.get\(|os\.getenv\(|os\.environ\[)\s*"""
    r"""(["']DECONFLOW_|p \+|(?!DAGSTER_PIPES_)[A-Z_]+_VAR)"""
)
# Where DECONFLOW_* may be read: the settings module and the dev tools (deconflow_dev: their
# own ports and state folders).
READERS = {"deconflow/settings.py", "deconflow_dev"}


def _sources():
    for top in ("deconflow", "deconflow_dev"):
        yield from sorted((REPO / top).rglob("*.py"))


def test_the_configuration_reference_is_in_sync():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == settings.markdown(), (
        "regenerate: python3 -m deconflow.settings --markdown > docs/configuration.md"
    )


def test_every_variable_the_code_names_is_a_setting():
    names = set()
    for p in _sources():
        names |= set(NAME.findall(p.read_text()))
    prefixes = {"DECONFLOW_ANALYSIS", "DECONFLOW_WATCHDOG"}  # prefixes, built into names
    assert names - prefixes - set(SETTINGS) == set()


def test_settings_are_read_in_at_most_three_places():
    readers = set()
    for p in _sources():
        rel = p.relative_to(REPO).as_posix()
        if READ.search(p.read_text()):
            owner = next((r for r in READERS if rel == r or rel.startswith(r + "/")), rel)
            readers.add(owner)
    assert readers <= READERS and len(readers) <= 3, sorted(readers)


BAD = {"int": "abc", "float": "1e", "choice": "huge", "bool": "maybe", "json": "{oops"}


@pytest.mark.parametrize("name", sorted(n for n, s in SETTINGS.items() if s.kind in BAD))
def test_every_bad_value_is_one_line_naming_the_variable(name):
    s = SETTINGS[name]
    with pytest.raises(SettingError) as e:
        settings.get(name, {name: BAD[s.kind]})
    msg = str(e.value)
    assert msg.startswith(name) and "\n" not in msg
    if s.low is not None:
        with pytest.raises(SettingError, match=f"^{name} must be .*>= "):
            settings.get(name, {name: str(int(s.low) - 1)})


def test_values_parse_to_their_types():
    assert settings.get("DECONFLOW_TRAINING_SLOTS", {}) == 2
    assert settings.get("DECONFLOW_TRAINING_SLOTS", {"DECONFLOW_TRAINING_SLOTS": "5"}) == 5
    assert settings.get("DECONFLOW_DB_RETAIN_S", {"DECONFLOW_DB_RETAIN_S": "0.5"}) == 0.5
    assert settings.get("DECONFLOW_TRAIN_OVERRIDES", {}) == {}
    assert settings.get("DECONFLOW_WATCHDOG_CONFIRM_DIVERGED", {}) is False
    env = {"DECONFLOW_WATCHDOG_CONFIRM_DIVERGED": "true"}
    assert settings.get("DECONFLOW_WATCHDOG_CONFIRM_DIVERGED", env) is True
    with pytest.raises(SettingError, match="^DECONFLOW_PG_URL must be a URL"):
        settings.get("DECONFLOW_PG_URL", {"DECONFLOW_PG_URL": "mysql://x"})


def test_the_orchestrator_reports_bad_settings_by_name(monkeypatch):
    from deconflow.instance import render_dagster_yaml
    from deconflow.sensors.policy import WatchdogSettings

    monkeypatch.setenv("DECONFLOW_WATCHDOG_OOM_RETRIES", "abc")
    with pytest.raises(ValueError, match="^DECONFLOW_WATCHDOG_OOM_RETRIES must be"):
        WatchdogSettings.from_env()
    monkeypatch.setenv("DECONFLOW_ANALYSIS_SLOTS", "0")
    with pytest.raises(ValueError, match="^DECONFLOW_ANALYSIS_SLOTS must be"):
        render_dagster_yaml()
