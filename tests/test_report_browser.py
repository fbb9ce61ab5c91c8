"""The sweep report as a reader sees it: the ``sweep_report`` asset, materialized through
Dagster on synthetic runs, opened in real headless Chromium (Debian's). The page's images
must decode (non-zero natural size), its tables must have rows, and it must need nothing from
outside the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from bench.analysis_scale import synth_run
from deconflow.sweep import load_grid
from tests.helpers import data_path, downstream, make_defs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
GRID = load_grid()

PROBE = """
<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth,
                                                h: i.naturalHeight, complete: i.complete}));
  const tables = [...document.querySelectorAll("table")].map(t => t.tBodies[0] ?
      t.tBodies[0].rows.length : 0);
  const heads = [...document.querySelectorAll("h2")].map(h => h.textContent);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({imgs, tables, heads});
  document.body.appendChild(out);
});
</script>
"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def report(sweep_env):
    """Synthetic published runs (two variants, a few seeds), then every downstream asset."""
    rng = np.random.default_rng(3)
    cells = [c for c in GRID.cells if c.variant in ("base", "adamw") and c.seed < 2]
    for cell in cells:
        d = data_path("runs", cell.key)
        d.mkdir(parents=True)
        synth_run(d, cell.key, 6240, rng)  # 16 epochs of 390 steps: alpha_early is defined
    instance = dg.DagsterInstance.get()
    result = dg.materialize(downstream(make_defs()), instance=instance, raise_on_error=False)
    assert result.success
    mats = {
        m.event_specific_data.materialization.asset_key.to_user_string(): (
            m.event_specific_data.materialization
        )
        for m in result.get_asset_materialization_events()
    }
    return mats["sweep_report"], len(cells)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
def test_report_renders_in_headless_chromium(report, tmp_path):
    mat, n_runs = report
    path = Path(mat.metadata["path"].value)
    assert mat.metadata["url"].value == path.as_uri()
    text = path.read_text()
    # Self-contained: no script, no external reference of any kind.
    assert "<script" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    # Chromium loads a copy with a probe that writes what rendered into the DOM.
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    r = _chromium("--dump-dom", probed.as_uri(), profile=tmp_path / "profile")
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"no probe in the DOM; chromium said: {r.stderr[-2000:]}"
    probe = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    imgs = {i["alt"]: i for i in probe["imgs"]}
    assert {
        "completeness heat-map",
        "loss curves adamw",
        "loss curves base",
        "R² histogram",
        "alpha_early vs best validation CE",
    } <= set(imgs)
    for alt, img in imgs.items():
        assert img["complete"] and img["w"] > 200 and img["h"] > 100, (alt, img)
    # Tables with rows: hypotheses and the per-run fits.
    assert len(probe["tables"]) >= 2 and all(n > 0 for n in probe["tables"])
    assert n_runs in probe["tables"]
    assert "Hypotheses" in probe["heads"]
    # And as pixels: a screenshot of the page is not blank.
    shot = tmp_path / "shot.png"
    r = _chromium(
        f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri(), profile=tmp_path / "p2"
    )
    assert shot.exists(), r.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.shape[0] >= 2000 and colours > 50, colours


def test_report_is_linked_from_the_ui(report):
    mat, _ = report
    assert isinstance(mat.metadata["url"], dg.UrlMetadataValue)
    assert isinstance(mat.metadata["path"], dg.PathMetadataValue)
    assert mat.metadata["images"].value >= 5
