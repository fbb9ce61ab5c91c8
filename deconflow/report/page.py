"""The report page: the gathered data as embedded JSON, the hand-written JavaScript and CSS
(``static/report.js``, ``static/report.css``) inline. Nothing is fetched: the file opens
offline, from a laptop's file manager or an e-mail attachment."""

from __future__ import annotations

import datetime as dt
import html
import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pandas as pd

from deconflow.atomic import atomic_write_bytes
from deconflow.report.data import gather


def _static(name: str) -> str:
    return resources.files("deconflow.report").joinpath("static", name).read_text()


SECTIONS = [
    ("verdicts", "Primary verdicts"),
    ("gates", "Quality gates per variant"),
    ("completeness", "Completeness"),
    ("curves", "Loss curves: seed mean and band per cell"),
    ("h2", "H2: alpha_early vs best validation CE, within variant"),
    ("hparams", "Hyper-parameters vs outcome"),
    ("failures", "Failures and exclusions"),
    ("runs", "Runs"),
]


def _json_for_script(obj) -> str:
    """JSON safe inside <script>: no '</' (closing tag) and no U+2028/9 line separators."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render(data: dict, title: str) -> str:
    nav = " ".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t in SECTIONS)
    body = "\n".join(
        f'<section id="{k}"><h2>{html.escape(t)}</h2><div class="body"></div></section>'
        for k, t in SECTIONS
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_static('report.css')}</style></head><body>",
            f"<header><h1>{html.escape(title)}</h1>",
            f'<p class="meta">generated {html.escape(data["generated"])}; covers '
            f"{html.escape(data['coverage'])}</p>",
            f'<p id="counts" class="counts"></p><nav>{nav}</nav></header>',
            '<main id="main">',
            body,
            "</main>",
            '<aside id="panel" hidden><button id="panel-close" title="close">&times;</button>'
            '<div id="panel-body"></div></aside>',
            '<div id="tip" role="tooltip"></div>',
            '<noscript><p class="missing">This report draws its charts with JavaScript; '
            "the numbers are in the DuckDB file.</p></noscript>",
            f'<script type="application/json" id="report-data">{_json_for_script(data)}</script>',
            f"<script>{_static('report.js')}</script>",
            "</body></html>",
        ]
    )


def build_report(
    out: Path,
    *,
    title: str,
    coverage: dict,
    completeness: pd.DataFrame | None,
    fits: pd.DataFrame | None,
    hypotheses: pd.DataFrame | None,
    excluded: pd.DataFrame | None,
    gates: pd.DataFrame | None = None,
    published: dict[str, Path] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write the report to ``out`` (atomically: a reader sees the old page or the new one);
    returns what it holds and how long each part took."""
    t0 = time.perf_counter()
    data = gather(
        fits=fits,
        completeness=completeness,
        hypotheses=hypotheses,
        excluded=excluded,
        gates=gates,
        published=published or {},
        progress=progress,
    )
    t_gather = time.perf_counter() - t0
    data["generated"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    data["coverage"] = str(coverage.get("text", ""))
    data["title"] = title
    text = render(data, title).encode()
    atomic_write_bytes(out, lambda f: f.write(text))
    return {
        "bytes": len(text),
        "runs": len(data["runs"]["rows"]),
        "curves": len(data["train"]),
        "variants": data["variants"],
        "generated": data["generated"],
        "gather_s": round(t_gather, 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
