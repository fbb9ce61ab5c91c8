"""Which training profile the sweep runs and with which overrides."""

from __future__ import annotations

import dataclasses
import difflib
import json

import dagster as dg

from deconflow.profiles import TrainConfig, get_profile


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
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise dg.Failure(f"unknown training setting {key!r} in overrides_json{hint}")
        try:
            get_profile(
                self.profile,
                **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()},
            )  # validates every value
        except (ValueError, TypeError) as e:
            raise dg.Failure(f"invalid training settings: {e}") from None
        return data
