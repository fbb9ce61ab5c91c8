"""The sweep report as a researcher uses it: the ``sweep_report`` asset, materialized through
Dagster on synthetic published runs, opened in Debian's headless Chromium and driven over the
DevTools protocol (``tests/cdp.py``): the charts are drawn, hovering a point names its run,
the run table sorts and filters, clicking a row shows the run's curves with fit and knee,
and the page asks the network for nothing."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from bench.analysis_scale import synth_run
from deconflow.sweep import load_grid
from tests.cdp import CHROMIUM, Browser
from tests.helpers import data_path, downstream, make_defs

GRID = load_grid()
READY = "document.body.getAttribute('data-ready') === '1'"


@pytest.fixture(scope="module")
def report(sweep_env):
    """Synthetic published runs (two variants, two lrs, three seeds; one run diverged),
    then every downstream asset (tables, DuckDB file, report)."""
    rng = np.random.default_rng(3)
    cells = [
        c
        for c in GRID.cells
        if c.variant in ("base", "adamw") and c.seed < 3 and c.weight_decay == 1e-3
    ]
    cells = [c for c in cells if c.lr in (0.05, 0.1)]
    for cell in cells:
        d = data_path("runs", cell.key)
        d.mkdir(parents=True)
        synth_run(d, cell.key, 6240, rng)  # 16 epochs of 390 steps: alpha_early is defined
    diverged = cells[-1].key
    d = data_path("runs", diverged)
    b = pd.read_parquet(d / "batch_metrics.parquet")
    b.loc[b.index[-100:], ["loss_nats", "loss_bits"]] = np.nan
    b.to_parquet(d / "batch_metrics.parquet")
    summary = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**summary, "outcome": "diverged"}))
    instance = dg.DagsterInstance.get()
    result = dg.materialize(downstream(make_defs()), instance=instance, raise_on_error=False)
    assert result.success
    mats = {
        m.event_specific_data.materialization.asset_key.to_user_string(): (
            m.event_specific_data.materialization
        )
        for m in result.get_asset_materialization_events()
    }
    return mats["sweep_report"], [c.key for c in cells], diverged


@pytest.mark.slow
def test_report_is_linked_from_the_ui(report):
    mat, keys, _ = report
    assert isinstance(mat.metadata["url"], dg.UrlMetadataValue)
    assert isinstance(mat.metadata["path"], dg.PathMetadataValue)
    path = Path(mat.metadata["path"].value)
    assert mat.metadata["url"].value == path.as_uri()
    assert path == data_path("report", "index.html").resolve()
    assert mat.metadata["runs"].value == len(keys)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
def test_report_explored_in_headless_chromium(report):
    mat, keys, diverged = report
    path = Path(mat.metadata["path"].value)
    text = path.read_text()
    # Self-contained: every script and style inline, nothing referenced outside the file.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    assert "<script src" not in text and "<link" not in text

    with Browser() as b:
        b.open(path.as_uri())
        b.wait_for(READY, timeout=30)
        assert b.exceptions() == []

        # The charts are drawn: each kind present, each with marks in it.
        drawn = b.eval(
            "(() => { const o = {}; for (const s of document.querySelectorAll('svg.chart')) {"
            " const k = s.dataset.chart; o[k] = (o[k] || 0) +"
            " s.querySelectorAll('path[data-tip], circle[data-tip], rect[data-tip]').length; }"
            " return o; })()"
        )
        for kind in ("curves", "h2", "h2-pooled", "hparams", "completeness", "ci"):
            assert drawn.get(kind, 0) > 0, (kind, drawn)
        heads = b.eval("[...document.querySelectorAll('h2')].map(h => h.textContent)")
        for h in ("Primary verdicts", "Quality gates per variant", "Completeness", "Failures"):
            assert any(x.startswith(h) for x in heads), (h, heads)
        # Gates are evaluated (the DuckDB file exists) and have one column per variant.
        gate_cols = b.eval("[...document.querySelectorAll('#gates th')].map(t => t.textContent)")
        assert {"adamw", "base"} <= set(gate_cols), gate_cols
        # The diverged run is listed with its reason among failures and exclusions.
        failures = b.eval("document.querySelector('#failures').textContent")
        assert diverged in failures and "diverged" in failures

        # Hover a point of the H2 scatter: the tooltip names its run.
        sel = "svg[data-chart='h2'] circle[data-run]"
        run = b.eval(f"document.querySelector(\"{sel}\").getAttribute('data-run')")
        x, y = b.center_of(sel)
        b.mouse("mouseMoved", x, y)
        tip = b.eval(
            "(() => { const t = document.getElementById('tip');"
            " return [getComputedStyle(t).display, t.textContent]; })()"
        )
        assert tip[0] == "block" and run in tip[1], (run, tip)
        # ... and a seed's curve, and a line of the parallel coordinates.
        for sel in ("svg[data-chart='curves'] path.seed", "svg[data-chart='hparams'] path.pc"):
            run = b.eval(f"document.querySelector(\"{sel}\").getAttribute('data-run')")
            x, y = b.eval(
                f'(() => {{ const p = document.querySelector("{sel}");'
                " p.scrollIntoView({block: 'center'});"
                " const l = p.getTotalLength(), q = p.getPointAtLength(l * 0.5);"
                " const m = p.getScreenCTM(); return [q.x * m.a + m.e, q.y * m.d + m.f]; })()"
            )
            b.mouse("mouseMoved", x, y)
            got = b.eval("document.getElementById('tip').textContent")
            assert got.split("  ")[0].split("\n")[0] in keys, (sel, got)

        # The run table sorts (click a header) ...
        col = "#runs th[data-col='best_val_ce']"
        b.click(*b.center_of(col))
        b.click(*b.center_of(col))  # descending
        idx = b.eval(
            "[...document.querySelectorAll('#runs th')].findIndex(t => "
            "t.dataset.col === 'best_val_ce')"
        )
        vals = b.eval(
            f"[...document.querySelectorAll('#runs tbody tr')].map(r => r.cells[{idx}].textContent)"
        )
        nums = [float(v) for v in vals if v]
        assert len(nums) >= len(keys) - 1 and nums == sorted(nums, reverse=True), vals
        # ... and filters (type into its box).
        b.click(*b.center_of("#runs input.filter"))
        b.type_text("adamw")
        shown = b.eval("[...document.querySelectorAll('#runs tbody tr')].map(r => r.dataset.run)")
        assert shown and all(r.startswith("adamw") for r in shown), shown
        assert len(shown) == sum(k.startswith("adamw") for k in keys)

        # Click a row: the run panel shows its train and validation curves, fit and knee.
        target = shown[0]
        b.click(*b.center_of(f"#runs tbody tr[data-run='{target}']"))
        b.wait_for("!document.getElementById('panel').hidden", timeout=5)
        panel = b.eval(
            "(() => { const p = document.getElementById('panel');"
            " const c = [...p.querySelectorAll('svg[data-chart=run] [data-run-curve]')];"
            " return {run: p.getAttribute('data-run-shown'),"
            " curves: c.filter(e => (e.getAttribute('d') || '').length > 20)"
            ".map(e => e.dataset.runCurve), title: p.querySelector('h2').textContent}; })()"
        )
        assert panel["run"] == target and panel["title"] == target, panel
        assert {"train", "val", "fit", "knee"} <= set(panel["curves"]), panel

        # A click on a point opens its run too.
        sel = "svg[data-chart='h2-pooled'] circle[data-run]"
        run = b.eval(f"document.querySelector(\"{sel}\").getAttribute('data-run')")
        b.eval("document.getElementById('panel').hidden = true")
        b.click(*b.center_of(sel))
        assert b.eval("document.getElementById('panel').getAttribute('data-run-shown')") == run

        assert b.exceptions() == []
        outside = [u for u in b.requests() if not u.startswith(("file:", "data:", "about:"))]
        assert outside == []
