"""The sweep report: one self-contained HTML page (``data/report/index.html``).

Pictures are the PNGs the analysis assets drew (``data/report/figures/``), inlined as base64
data URIs; tables are plain HTML; the style sheet is inline. No script, no external asset:
the file opens anywhere, from a laptop's file manager to an e-mail attachment.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
from pathlib import Path

import pandas as pd

from deconflow.atomic import atomic_write_bytes
from deconflow.protocol import FAILED
from deconflow.settings import data_root

FIGURES = "figures"


def report_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "report"


def figure_path(name: str) -> Path:
    return report_dir() / FIGURES / f"{name}.png"


def save_figure(name: str, data: bytes) -> Path:
    path = figure_path(name)
    atomic_write_bytes(path, lambda f: f.write(data))
    return path


STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; font-size: 13px; } .figure { margin: 10px 0 18px 0; }
.figure img { max-width: 100%; border: 1px solid #eee; }
.caption { font-size: 12px; color: #555; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.pass { color: #2e7d32; font-weight: 600; } .fail { color: #c62828; font-weight: 600; }
.counts span { display: inline-block; margin-right: 14px; }
.missing { color: #888; font-style: italic; }
"""


def _img(path: Path, alt: str, caption: str = "") -> str:
    if not path.exists():
        return f'<p class="missing">{html.escape(alt)}: not drawn yet</p>'
    b64 = base64.b64encode(path.read_bytes()).decode()
    cap = f'<div class="caption">{html.escape(caption)}</div>' if caption else ""
    return (
        f'<div class="figure"><img alt="{html.escape(alt)}" '
        f'src="data:image/png;base64,{b64}">{cap}</div>'
    )


def _fmt(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def html_table(df: pd.DataFrame, max_rows: int = 500, cls_col: str | None = None) -> str:
    """A plain HTML table; text columns left-aligned; a boolean ``cls_col`` is coloured."""
    if df is None or df.empty:
        return '<p class="missing">(no rows)</p>'
    text = {c for c, t in df.dtypes.items() if not pd.api.types.is_numeric_dtype(t)}
    head = "".join(
        f'<th class="{"l" if c in text else ""}">{html.escape(str(c))}</th>' for c in df.columns
    )
    rows = []
    for rec in df.head(max_rows).itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, rec, strict=True):
            if hasattr(v, "item") and not isinstance(v, str):
                v = v.item()  # numpy scalars
            cls = "l" if c in text else ""
            if c == cls_col and isinstance(v, bool | int) and v is not pd.NA:
                cls += " pass" if bool(v) else " fail"
            cells.append(f'<td class="{cls.strip()}">{html.escape(_fmt(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = (
        f'<p class="caption">first {max_rows} of {len(df)} rows; all of them in DuckDB</p>'
        if len(df) > max_rows
        else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def build_report(
    out: Path,
    *,
    title: str,
    coverage: dict,
    completeness: pd.DataFrame | None,
    fits: pd.DataFrame | None,
    hypotheses: pd.DataFrame | None,
    excluded: pd.DataFrame | None,
    figures: Path,
) -> dict:
    """Write the report to ``out`` (atomically); returns what it holds."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    variants = sorted(fits["variant"].unique()) if fits is not None and len(fits) else []
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">generated {now}; covers {html.escape(str(coverage.get("text", "")))}</p>',
    ]
    if completeness is not None and len(completeness):
        counts = completeness["status"].value_counts().to_dict()
        parts.append(
            '<p class="counts">'
            + "".join(
                f"<span><b>{html.escape(k)}</b> {v}</span>" for k, v in sorted(counts.items())
            )
            + "</p>"
        )
    parts.append("<h2>Completeness</h2>")
    parts.append(
        _img(
            figures / "completeness_heatmap.png",
            "completeness heat-map",
            "variant x (lr, weight decay) x seed; colour = status of the cell",
        )
    )
    if completeness is not None and len(completeness):
        bad = completeness[completeness["status"] == FAILED]
        if len(bad):
            parts.append("<details open><summary>failed cells</summary>")
            parts.append(html_table(bad[["run_id", "status", "reason"]]))
            parts.append("</details>")
    parts.append("<h2>Loss curves and power-law fits, per variant</h2>")
    if not variants:
        parts.append('<p class="missing">no run has landed yet</p>')
    for v in variants:
        parts.append(f"<h3>{html.escape(v)}</h3>")
        parts.append(
            _img(
                figures / f"loss_curves_{v}.png",
                f"loss curves {v}",
                "train loss per step (log-log), one line per seed; black dashed: the power "
                "law fitted after burn-in; triangle: the burn-in knee",
            )
        )
    parts.append("<h2>R² of the power-law fits</h2>")
    parts.append(_img(figures / "r_squared_histogram.png", "R² histogram"))
    parts.append("<h2>H2: alpha_early vs best validation CE, per variant</h2>")
    parts.append(_img(figures / "alpha_vs_best_val.png", "alpha_early vs best validation CE"))
    parts.append("<h2>Hypotheses</h2>")
    parts.append(html_table(hypotheses, cls_col="passed"))
    if excluded is not None and len(excluded):
        parts.append(f"<details><summary>{len(excluded)} exclusions</summary>")
        parts.append(html_table(excluded))
        parts.append("</details>")
    if fits is not None and len(fits):
        parts.append("<h2>Per-run fits</h2>")
        parts.append(html_table(fits, max_rows=300))
    parts.append("</body></html>")
    text = "\n".join(parts)
    atomic_write_bytes(out, lambda f: f.write(text.encode()))
    return {
        "bytes": len(text),
        "images": text.count("<img "),
        "variants": variants,
        "generated": now,
    }
