"""The report's data gathering, without a browser: verdicts, gates per variant, curve
downsampling, seed bands, the embedded JSON and the page's atomic write."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from bench.analysis_scale import synth_run
from deconflow.report import data as rdata
from deconflow.report.page import build_report
from deconflow.sweep import load_grid
from deconflow.warehouse import tables as tables_mod

GRID = load_grid()


def _hyp(**over) -> dict:
    row = {"hypothesis": "H2", "scope": "pooled", "method": "pearson", "value": 0.8}
    row.update(ci_low=0.75, ci_high=0.9, threshold=0.7, passed=True)
    row.update(over)
    return row


@pytest.mark.parametrize(
    "over, want",
    [
        ({}, "PASS"),
        ({"ci_low": 0.1, "ci_high": 0.6}, "FAIL"),
        ({"ci_low": 0.5, "ci_high": 0.9}, "INCONCLUSIVE"),
        ({"ci_low": math.nan, "ci_high": math.nan}, "INCONCLUSIVE"),
        ({"ci_low": None, "ci_high": None}, "INCONCLUSIVE"),
        ({"passed": False}, "INCONCLUSIVE"),  # the row itself says it could not pass
        ({"verdict": "FAIL"}, "FAIL"),  # the science table's own verdict wins
        ({"verdict": "inconclusive", "ci_low": 0.9}, "INCONCLUSIVE"),
    ],
)
def test_derive_verdict(over, want):
    assert rdata.derive_verdict(_hyp(**over)) == want


def test_verdicts_put_primary_rows_first_and_show_all_without_them():
    rows = [_hyp(scope="variant=base"), _hyp(scope="within", ci_low=0.1, ci_high=0.5)]
    plain = rdata.verdicts(pd.DataFrame(rows))
    assert not plain["has_primary"] and len(plain["rows"]) == 2
    vcol = plain["columns"].index("verdict")
    assert [r[vcol] for r in plain["rows"]] == ["PASS", "FAIL"]
    df = pd.DataFrame(rows).assign(primary=[False, True], tier=["secondary", "primary"])
    marked = rdata.verdicts(df)
    assert marked["has_primary"]
    scope = marked["columns"].index("scope")
    assert [r[scope] for r in marked["rows"]] == ["within", "variant=base"]


def test_gates_are_split_by_the_variant_of_the_runs_they_name():
    gates = pd.DataFrame(
        {
            "gate": ["train loss in [0, 10]", "knee epoch within the profile's window"],
            "passed": [False, True],
            "severity": ["error", "error"],
            "violations": [3, 0],
            "n_runs": [2, 0],
            "runs": ["adamw__lr0.2_wd0.01_s0, base__lr0.1_wd0.001_s3", ""],
            "detail": ["...", "none"],
        }
    )
    out = rdata.gates_by_variant(gates, ["adamw", "base", "narrow"])
    assert out["evaluated"] and out["go"] is False
    first = out["gates"][0]
    assert first["runs"] == {
        "adamw": ["adamw__lr0.2_wd0.01_s0"],
        "base": ["base__lr0.1_wd0.001_s3"],
    }
    assert out["gates"][1]["runs"] == {}
    # Gates evaluated per variant (a `variant` column): one row per gate, runs per variant.
    per = pd.DataFrame(
        {
            "gate": ["g", "g"],
            "variant": ["adamw", "base"],
            "passed": [False, True],
            "violations": [2, 0],
            "runs": ["adamw__lr0.2_wd0.01_s0", ""],
        }
    )
    merged = rdata.gates_by_variant(per, ["adamw", "base"])
    assert len(merged["gates"]) == 1 and merged["go"] is False
    assert merged["gates"][0]["runs"]["adamw"] == ["adamw__lr0.2_wd0.01_s0"]
    assert rdata.gates_by_variant(None, ["base"])["evaluated"] is False


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Six published synthetic runs of two cells (3 seeds each), 2,000 steps, one of them
    ending in NaN losses; their real run_fits."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(5)
    cells = [c for c in GRID.cells if c.variant == "base" and c.lr == 0.1 and c.seed < 3]
    cells = [c for c in cells if c.weight_decay in (1e-4, 1e-3)]
    published = {}
    for cell in cells:
        d = root / cell.key
        d.mkdir()
        synth_run(d, cell.key, 2000, rng)
        published[cell.key] = d
    bad = cells[-1].key
    b = pd.read_parquet(published[bad] / "batch_metrics.parquet")
    b.loc[b.index[-50:], "loss_nats"] = np.nan  # the tail of a run that diverged
    b.to_parquet(published[bad] / "batch_metrics.parquet")
    return published, tables_mod.run_fits(published), bad


def test_downsampled_curves_keep_first_and_last_points(runs):
    published, _, bad = runs
    curves = rdata.read_curves(published, bins=40)
    for key, d in published.items():
        raw = pd.read_parquet(d / "batch_metrics.parquet")
        raw = raw[np.isfinite(raw["loss_nats"]) & (raw["loss_nats"] > 0)]
        got = curves["train"][curves["train"]["run_id"] == key]
        assert len(got) <= 40 + 2
        first, last = got.iloc[0], got.iloc[-1]
        assert first["step"] == raw["step"].iloc[0]
        assert first["loss"] == pytest.approx(raw["loss_nats"].iloc[0])
        assert last["step"] == raw["step"].iloc[-1]
        assert last["loss"] == pytest.approx(raw["loss_nats"].iloc[-1])
        assert got["step"].is_monotonic_increasing
        val = curves["val"][curves["val"]["run_id"] == key]
        assert (
            len(val)
            and val["step"].iloc[-1] == pd.read_parquet(d / "val_metrics.parquet")["step"].max()
        )
    # The NaN tail is not drawn: the curve ends at the last finite loss.
    tail = curves["train"][curves["train"]["run_id"] == bad]["step"].max()
    assert tail == 1950


def test_seed_bands_hold_their_seeds(runs):
    published, fits, _ = runs
    curves = rdata.read_curves(published, bins=40)
    bands = rdata.cell_bands(curves["train"], fits)
    assert set(bands["weight_decay"]) == {1e-4, 1e-3}
    assert (bands["lo"] <= bands["mean"] + 1e-12).all()
    assert (bands["mean"] <= bands["hi"] + 1e-12).all()
    assert bands["n"].max() == 3
    # The geometric mean of one bin is the mean of its seeds' log losses.
    one = bands.iloc[len(bands) // 2]
    seeds = curves["train"].merge(fits[["run_id", "weight_decay"]], on="run_id")
    seeds = seeds[(seeds["bin"] == one["bin"]) & (seeds["weight_decay"] == one["weight_decay"])]
    assert one["mean"] == pytest.approx(np.exp(np.log(seeds["loss"]).mean()))


def _embedded(path) -> dict:
    text = path.read_text()
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert m
    return json.loads(m.group(1))


def test_every_fitted_run_is_in_the_page(runs, tmp_path):
    published, fits, _ = runs
    comp = fits[["run_id", "variant", "lr", "weight_decay", "seed"]].assign(
        status="materialized", attempts=1, reason="ok"
    )
    out = tmp_path / "report" / "index.html"
    info = build_report(
        out,
        title="t",
        coverage={"text": "6 of 216"},
        completeness=comp,
        fits=fits,
        hypotheses=None,
        excluded=None,
        published=published,
    )
    data = _embedded(out)
    ids = [r[data["runs"]["columns"].index("run_id")] for r in data["runs"]["rows"]]
    assert sorted(ids) == sorted(fits["run_id"])
    assert set(data["train"]) == set(fits["run_id"]) == set(data["val"])
    assert info["runs"] == len(fits) and info["bytes"] == out.stat().st_size
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<script src" not in text


def test_bad_input_is_one_line_and_leaves_the_old_page(runs, tmp_path):
    published, fits, _ = runs
    out = tmp_path / "index.html"
    out.write_text("old page")
    with pytest.raises(rdata.ReportInputError, match="run_fits lacks column.*variant"):
        build_report(
            out,
            title="t",
            coverage={},
            completeness=None,
            fits=fits.drop(columns=["variant"]),
            hypotheses=None,
            excluded=None,
            published=published,
        )
    assert out.read_text() == "old page"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".index.html")]


def test_bins_shrink_with_the_sweep():
    assert rdata.n_bins(216) == rdata.MAX_BINS
    assert rdata.MIN_BINS <= rdata.n_bins(10_000) < rdata.MAX_BINS


def test_a_missing_table_is_one_line_naming_it(tmp_path, monkeypatch):
    from deconflow.report.build import build_from_tables

    monkeypatch.setenv("DECONFLOW_DATA", str(tmp_path))
    with pytest.raises(rdata.ReportInputError, match=r"table run_fits has not been computed"):
        build_from_tables(tmp_path / "report" / "index.html", GRID)
    assert not (tmp_path / "report" / "index.html").exists()
