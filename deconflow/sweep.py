"""The sweep grid as data: cells and grid files.

A cell's key (``base__lr0.1_wd0.0001_s0``) and every other key <-> cell conversion are
owned by :mod:`deconflow.keys`.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from deconflow import settings as _settings

# The key format and its parsing live in deconflow.keys; re-exported for the grid's users.
from deconflow.keys import (  # noqa: F401
    KEY_SEP,
    GridError,
    cell_key,
    format_number,
    hp_key,
    parse_hp,
    parse_key,
)

VARIANTS = ("base", "bn_off", "narrow", "adamw")


@dataclass(frozen=True, order=True)
class Cell:
    """One training run of the sweep: a variant and its hyper-parameters."""

    variant: str
    lr: float
    weight_decay: float
    seed: int

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise GridError(
                f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}"
            )
        if not (isinstance(self.lr, int | float) and np.isfinite(self.lr) and self.lr > 0):
            raise GridError(f"learning rate must be a finite number > 0, got {self.lr!r}")
        if not (
            isinstance(self.weight_decay, int | float)
            and np.isfinite(self.weight_decay)
            and self.weight_decay >= 0
        ):
            raise GridError(f"weight decay must be a finite number >= 0, got {self.weight_decay!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise GridError(f"seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "weight_decay", float(self.weight_decay))

    @property
    def hp(self) -> str:
        """Hyper-parameter part of the key, the ``hp`` partition dimension."""
        return hp_key(self.lr, self.weight_decay, self.seed)

    @property
    def key(self) -> str:
        return cell_key(self.variant, self.hp)

    def as_dict(self) -> dict:
        return {
            "variant": self.variant,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "key": self.key,
        }


@dataclass(frozen=True)
class Grid:
    """The sweep's axes; ``cells`` is the cartesian product in a fixed order."""

    variants: tuple[str, ...]
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    seeds: tuple[int, ...]
    name: str = "loss-slope-sweep"

    @property
    def cells(self) -> list[Cell]:
        return [
            Cell(v, lr, wd, s)
            for v in self.variants
            for lr in self.lrs
            for wd in self.weight_decays
            for s in self.seeds
        ]

    @property
    def hps(self) -> list[str]:
        """Sorted hp partition keys (lr, then wd, then seed, numerically)."""
        return [
            Cell(self.variants[0], lr, wd, s).hp
            for lr in sorted(self.lrs)
            for wd in sorted(self.weight_decays)
            for s in sorted(self.seeds)
        ]

    def __len__(self) -> int:
        return len(self.variants) * len(self.lrs) * len(self.weight_decays) * len(self.seeds)

    def __contains__(self, cell: object) -> bool:
        return (
            isinstance(cell, Cell)
            and cell.variant in self.variants
            and cell.lr in self.lrs
            and cell.weight_decay in self.weight_decays
            and cell.seed in self.seeds
        )


GRID_FIELDS = ("name", "variants", "lr", "weight_decay", "seed")


def _is_number(x: object) -> bool:
    """A TOML number: int or float, never a bool (``true`` is not 1) or a string."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def _typed_list(source: str, name: str, values: object, kind: str) -> tuple:
    """One grid axis: a non-empty list of unique values of one type, nothing nested."""
    if not isinstance(values, list) or not values:
        raise GridError(f"{source}: grid field {name!r} must be a non-empty list, got {values!r}")
    for x in values:
        ok = {
            "number": _is_number(x),
            "integer": isinstance(x, int) and not isinstance(x, bool),
            "string": isinstance(x, str),
        }[kind]
        if not ok:
            raise GridError(
                f"{source}: grid field {name!r} must hold {kind}s only, got {x!r} "
                f"({type(x).__name__}) in {values!r}"
            )
    if len(set(values)) != len(values):
        raise GridError(f"{source}: grid field {name!r} has duplicate values: {values}")
    return tuple(values)


def grid_from_dict(data: dict, source: str = "<grid>") -> Grid:
    """A grid from parsed TOML: typed values (numbers are numbers), unknown keys rejected."""
    if not isinstance(data, dict):
        raise GridError(f"{source}: a grid must be a table of fields, got {type(data).__name__}")
    unknown = [k for k in data if k not in GRID_FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), GRID_FIELDS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise GridError(
            f"{source}: unknown grid field(s) {', '.join(hints)}; expected {', '.join(GRID_FIELDS)}"
        )
    missing = [k for k in GRID_FIELDS[1:] if k not in data]
    if missing:
        raise GridError(f"{source}: missing grid field(s) {', '.join(missing)}")
    if "name" in data and not (isinstance(data["name"], str) and data["name"].strip()):
        raise GridError(f"{source}: grid name must be a non-empty string, got {data['name']!r}")
    variants = _typed_list(source, "variants", data["variants"], "string")
    lrs = tuple(float(x) for x in _typed_list(source, "lr", data["lr"], "number"))
    wd_values = _typed_list(source, "weight_decay", data["weight_decay"], "number")
    wds = tuple(float(x) for x in wd_values)
    seeds = _typed_list(source, "seed", data["seed"], "integer")
    for name, values in (("lr", lrs), ("weight_decay", wds)):
        if len(set(values)) != len(values):  # 1 and 1.0
            raise GridError(f"{source}: grid field {name!r} has duplicate values: {list(values)}")
    # Validate every axis value once through Cell.
    try:
        for v in variants:
            Cell(v, lrs[0], wds[0], seeds[0])
        for lr in lrs:
            Cell(variants[0], lr, wds[0], seeds[0])
        for wd in wds:
            Cell(variants[0], lrs[0], wd, seeds[0])
        for s in seeds:
            Cell(variants[0], lrs[0], wds[0], s)
    except GridError as e:
        raise GridError(f"{source}: {e}") from None
    return Grid(variants, lrs, wds, seeds, name=str(data.get("name", "loss-slope-sweep")))


def default_grid_path() -> Path:
    """``$DECONFLOW_GRID`` if set, else the grid file shipped in the package."""
    env = _settings.get("DECONFLOW_GRID")
    if env:
        return Path(env)
    return Path(str(resources.files("deconflow") / "grid.toml"))


def load_grid(path: str | os.PathLike | None = None) -> Grid:
    p = Path(path) if path is not None else default_grid_path()
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise GridError(f"grid file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise GridError(f"grid file {p} is not valid TOML: {e}") from None
    return grid_from_dict(data, source=str(p))
