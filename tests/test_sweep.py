"""The grid as data: 216 cells, stable keys that round-trip, clear errors."""

from __future__ import annotations

import pytest

from deconflow.sweep import Cell, GridError, grid_from_dict, load_grid, parse_key


def test_the_packaged_grid_has_216_unique_cells():
    grid = load_grid()
    keys = [c.key for c in grid.cells]
    assert len(grid) == 216 == len(set(keys))
    assert len(grid.hps) == 54 and len(set(grid.hps)) == 54


def test_keys_are_positional_and_round_trip():
    cell = Cell("bn_off", 0.2, 1e-4, 3)
    assert cell.key == "bn_off__lr0.2_wd0.0001_s3"
    assert parse_key(cell.key) == cell
    for c in load_grid().cells:
        assert parse_key(c.key) == c
        assert all(ch.isalnum() or ch in "_.-" for ch in c.key)


@pytest.mark.parametrize(
    "key",
    [
        "base",
        "base__lr0.1",
        "base__lr1e-4_wd0.1_s0",
        "base__lr0.10_wd0.1_s0",
        "resnet__lr0.1_wd0.1_s0",
        "base__lr0.1_wd0.1_s0;ls",
        "base__lr0_wd0.1_s0",
    ],
)
def test_malformed_keys_are_rejected(key):
    with pytest.raises(GridError):
        parse_key(key)


def test_adding_values_keeps_existing_keys():
    data = {"variants": ["base", "adamw"], "lr": [0.1], "weight_decay": [1e-3], "seed": [0, 1]}
    before = {c.key for c in grid_from_dict(data).cells}
    data["seed"].append(6)
    data["lr"].insert(0, 0.4)
    after = {c.key for c in grid_from_dict(data).cells}
    assert before < after and "adamw__lr0.4_wd0.001_s6" in after


@pytest.mark.parametrize(
    "data, message",
    [
        ({"variants": ["base"], "lr": [0.1], "weight_decay": [0.001]}, "missing grid field"),
        ({"variants": ["base"], "lr": [-0.1], "weight_decay": [0.0], "seed": [0]}, "learning rate"),
        ({"variants": ["base"], "lr": [0.1, 0.1], "weight_decay": [0.0], "seed": [0]}, "duplicate"),
        ({"variants": ["big"], "lr": [0.1], "weight_decay": [0.0], "seed": [0]}, "unknown variant"),
    ],
)
def test_bad_grid_files_give_one_line_errors(data, message):
    with pytest.raises(GridError, match=message) as e:
        grid_from_dict(data)
    assert "\n" not in str(e.value)


def test_grid_file_errors_name_the_path(tmp_path):
    with pytest.raises(GridError, match=str(tmp_path / "nope.toml")):
        load_grid(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("variants = [")
    with pytest.raises(GridError, match="not valid TOML"):
        load_grid(bad)
