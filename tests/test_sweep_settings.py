"""Training settings given to the Dagster resource: a typo or a bad value is one clear line
inside the run (as the UI shows it), never a TypeError traceback."""

from __future__ import annotations

import dagster as dg
import pytest

from deconflow.resources import SweepSettings


def test_unknown_setting_is_named_with_its_close_match() -> None:
    with pytest.raises(dg.Failure, match=r"unknown training setting 'epochz'.*'epochs'"):
        SweepSettings(overrides_json='{"epochz": 3}').overrides()


def test_bad_value_is_one_line() -> None:
    with pytest.raises(dg.Failure, match="invalid training settings: .*epochs") as e:
        SweepSettings(overrides_json='{"epochs": 0}').overrides()
    assert "\n" not in str(e.value.description)


def test_good_settings_pass_through() -> None:
    assert SweepSettings(overrides_json='{"epochs": 3}').overrides() == {"epochs": 3}
