"""Compute (local process or SLURM), sweep settings; chosen by environment, no code edits."""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path

from deconflow.resources.compute import ComputeResource, LocalProcessResource
from deconflow.resources.sweep_settings import SweepSettings


def compute_from_env() -> ComputeResource:
    """``DECONFLOW_COMPUTE=local`` (default) or ``slurm``; SLURM settings come from the
    TOML file named by ``DECONFLOW_SLURM_CONFIG`` (see README, "Running on a cluster")."""
    from deconflow import settings

    try:
        kind = settings.get("DECONFLOW_COMPUTE")
    except settings.SettingError as e:
        from deconflow.slurm.script import SlurmConfigError

        raise SlurmConfigError(str(e)) from None
    if kind == "slurm":
        return slurm_from_file(settings.get("DECONFLOW_SLURM_CONFIG"))
    return LocalProcessResource()


def slurm_from_file(path: str | os.PathLike | None) -> ComputeResource:
    """A ``SlurmResource`` from a TOML file (a ``[slurm]`` table, or its keys at the top),
    checked whole before anything is submitted: unknown keys (a typo like ``partiton``), wrong
    types and unsafe values are a one-line :class:`SlurmConfigError` naming the file."""
    import pydantic

    from deconflow.resources.slurm import SlurmResource
    from deconflow.slurm.script import SlurmConfigError

    where = str(path) if path else "SLURM settings"
    cfg: dict = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise SlurmConfigError(f"cannot read SLURM config {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise SlurmConfigError(f"SLURM config {path} is not valid TOML: {e}") from None
        cfg = data.get("slurm", data)
        extra = [k for k in data if k != "slurm"] if "slurm" in data else []
        if not isinstance(cfg, dict):
            raise SlurmConfigError(f"{where}: [slurm] must be a table of settings")
        if extra:
            raise SlurmConfigError(
                f"{where}: unknown top-level key(s) {', '.join(map(repr, extra))} next to "
                "[slurm]; every setting goes into the [slurm] table"
            )
    known = list(SlurmResource.model_fields)
    unknown = [k for k in cfg if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1, cutoff=0.6)
            hints.append(repr(k) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SlurmConfigError(
            f"{where}: unknown SLURM setting(s) {', '.join(hints)}; known: {', '.join(known)}"
        )
    try:
        resource = SlurmResource(**cfg)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ())) or "?"
        raise SlurmConfigError(
            f"{where}: invalid SLURM setting {field} = {err.get('input')!r}: {err.get('msg')}"
        ) from None
    try:
        resource.check_config()
    except SlurmConfigError as e:
        raise SlurmConfigError(f"{where}: {e}") from None
    return resource


def sweep_from_env() -> SweepSettings:
    from deconflow import settings

    return SweepSettings(
        profile=settings.raw("DECONFLOW_PROFILE"),
        overrides_json=settings.raw("DECONFLOW_TRAIN_OVERRIDES") or "{}",
    )


__all__ = [
    "ComputeResource",
    "LocalProcessResource",
    "SweepSettings",
    "compute_from_env",
    "slurm_from_file",
    "sweep_from_env",
]
