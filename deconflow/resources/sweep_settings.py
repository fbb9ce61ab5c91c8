"""Which training profile the sweep runs and with which overrides."""

from __future__ import annotations

import json

import dagster as dg

from deconflow.profiles import get_profile


class SweepSettings(dg.ConfigurableResource):
    """The profile (``demo`` by default, ``full`` for the science) and config overrides.

    ``overrides_json`` is a JSON object of TrainConfig fields, e.g.
    ``{"data_dir": "/shared/cifar-10-batches-py"}`` for the full profile.
    """

    profile: str = "demo"
    overrides_json: str = "{}"

    def overrides(self) -> dict:
        try:
            data = json.loads(self.overrides_json)
        except json.JSONDecodeError as e:
            raise dg.Failure(f"overrides_json is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise dg.Failure("overrides_json must be a JSON object")
        get_profile(
            self.profile, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        )  # validates
        return data
