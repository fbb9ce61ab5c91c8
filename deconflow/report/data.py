"""What the report shows, gathered into one JSON-able dict (the page embeds it whole).

Curves are downsampled for the page only (the DuckDB file keeps every row): each run's
train and validation losses are averaged in log-spaced step bins shared by every run of the
sweep (so seeds of a cell line up bin by bin), with the run's first and last finite points
kept exactly (the first bin holds step 1 alone). One DuckDB query reads all the runs'
Parquet files of a family at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from deconflow.protocol import DIVERGED, MATERIALIZED, family_file
from deconflow.sweep import GridError, parse_key

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
MAX_BINS = 160  # log-spaced step bins per curve (a curve has at most this many + 1 points)
MIN_BINS = 40
POINT_BUDGET = 400_000  # bins x runs: the page stays tens of MB at most at 10,000 runs
DIGITS = 5  # decimals kept for losses on the page

# run_fits columns the page carries (those present; the rest stay in DuckDB).
RUN_COLUMNS = [
    "run_id",
    "variant",
    "lr",
    "weight_decay",
    "seed",
    "outcome",
    "r_squared",
    "r_squared_noise_limited",
    "r_squared_ceiling",
    "r_squared_epoch_mean",
    "exponent",
    "intercept",
    "knee_epoch",
    "burn_in_step",
    "burn_in_loss",
    "alpha_early",
    "alpha_full",
    "best_val_ce",
    "best_val_epoch",
    "n_points",
]


class ReportInputError(ValueError):
    """A table the report needs is missing a column it cannot do without."""


# --- verdicts -----------------------------------------------------------------------------


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def derive_verdict(row) -> str:
    """PASS / FAIL / INCONCLUSIVE of one hypotheses row.

    The row's own ``verdict`` wins when it has one. Otherwise from its 95% CI against its
    threshold: PASS when the CI clears the threshold (and the row did not say it failed),
    FAIL when the CI lies wholly below it, else (CI straddling, or none) INCONCLUSIVE.
    """
    get = row.get if isinstance(row, dict) else (lambda k, d=None: getattr(row, k, d))
    verdict = get("verdict", None)
    if isinstance(verdict, str) and verdict.upper() in (PASS, FAIL, INCONCLUSIVE):
        return verdict.upper()
    low, high, thr = _num(get("ci_low")), _num(get("ci_high")), _num(get("threshold"))
    if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(thr)):
        return INCONCLUSIVE
    passed = get("passed", None)
    said_fail = passed is not None and passed is not pd.NA and not bool(passed)
    if low >= thr and not said_fail:
        return PASS
    if high < thr:
        return FAIL
    return INCONCLUSIVE


def verdicts(hyp: pd.DataFrame | None) -> dict:
    """Hypotheses rows with a verdict each; `primary` rows first when the table marks them
    (else every row is shown and `has_primary` is False)."""
    if hyp is None or hyp.empty:
        return {"has_primary": False, "rows": [], "columns": []}
    df = hyp.copy()
    df["verdict"] = [derive_verdict(r) for r in df.to_dict("records")]
    has_primary = "primary" in df.columns
    if has_primary:
        prim = df["primary"].fillna(False).astype(bool)
        df = pd.concat([df[prim], df[~prim]], ignore_index=True)
        df["primary"] = df["primary"].fillna(False).astype(bool)
    return {"has_primary": has_primary, **records(df)}


# --- quality gates ------------------------------------------------------------------------


def _variant_of(run: str) -> str:
    try:
        return parse_key(run).variant
    except GridError:
        return "?"


def _runs_named(value) -> list[str]:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return [r.strip() for r in value.split(",") if r.strip()]
    return [str(r) for r in value]


def _count(v) -> int:
    f = _num(v)
    return int(f) if math.isfinite(f) else 0


def gates_by_variant(gates: pd.DataFrame | None, variants: list[str]) -> dict:
    """Each gate's verdict overall and per variant, with the runs it names in each.

    A `variant` column (gates evaluated per variant) is used as it is; otherwise each gate's
    named runs are split by the variant in their cell key.
    """
    if gates is None:
        return {"evaluated": False, "go": None, "gates": [], "variants": variants}
    out = []
    for g in gates.to_dict("records"):
        runs = _runs_named(g.get("runs"))
        per: dict[str, list[str]] = {}
        if "variant" in g and isinstance(g.get("variant"), str):
            per[g["variant"]] = runs
        else:
            for r in runs:
                per.setdefault(_variant_of(r), []).append(r)
        out.append(
            {
                "gate": str(g.get("gate")),
                "passed": bool(g.get("passed")),
                "severity": str(g.get("severity") or "error"),
                "violations": _count(g.get("violations")),
                "detail": str(g.get("detail") or ""),
                "runs": per,
            }
        )
    if "variant" in gates.columns:  # one row per (gate, variant): merged per gate
        merged: dict[str, dict] = {}
        for g in out:
            m = merged.setdefault(g["gate"], {**g, "runs": {}, "violations": 0, "passed": True})
            m["runs"].update(g["runs"])
            m["violations"] += g["violations"]
            m["passed"] = m["passed"] and g["passed"]
        out = list(merged.values())
    seen = sorted({v for g in out for v in g["runs"]} | set(variants))
    return {
        "evaluated": True,
        "go": all(g["passed"] for g in out),
        "gates": out,
        "variants": seen,
    }


# --- curves -------------------------------------------------------------------------------


def n_bins(n_runs: int) -> int:
    """Bins per curve for a sweep of `n_runs`: MAX_BINS for a few hundred runs, fewer (not
    under MIN_BINS) for thousands, so the page stays a size a browser opens."""
    return int(max(MIN_BINS, min(MAX_BINS, POINT_BUDGET // max(1, n_runs))))


def _files(published: dict[str, Path], family: str) -> dict[str, str]:
    """Parquet file -> run key, for runs that have the family's file."""
    out = {}
    for key, d in published.items():
        f = Path(d) / family_file(family)
        if f.exists():
            out[str(f)] = key
    return out


def _sql_list(files) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _max_step(published: dict[str, Path]) -> int | None:
    """The longest run's last step from the run summaries (None if one does not say)."""
    import json

    from deconflow.protocol import SUMMARY

    hi = 0
    for d in published.values():
        try:
            s = json.loads((Path(d) / SUMMARY).read_text())
            steps = max(int(s.get("steps") or 0), int(s.get("total_steps") or 0))
        except (OSError, ValueError, TypeError):
            return None
        if steps <= 0:
            return None
        hi = max(hi, steps)
    return hi or None


def read_curves(published: dict[str, Path], bins: int | None = None) -> dict:
    """Downsampled train (batch) and validation loss curves of every published run.

    Returns {"scale": c, "train": frame, "val": frame}; each frame has run_id, bin, step,
    loss: bin means, `bin` = floor(ln(step) * c) with c = bins / ln(longest run's steps),
    the same bins for every run. The first bin of a run that logs from step 1 holds that
    step alone (c > 1 / ln 2), so the first point is exact; the last finite point is kept
    exactly as an extra row (bin `bins` + 1). Non-finite and non-positive losses are dropped
    (the log axis cannot show them). One scan of each family's files.
    """
    import duckdb

    cols = ["run_id", "bin", "step", "loss"]
    empty = pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    train_files, val_files = _files(published, "batch_metrics"), _files(published, "val_metrics")
    if not train_files:
        return {"scale": 0.0, "train": empty, "val": empty.copy()}
    bins = bins or n_bins(len(published))
    con = duckdb.connect()
    try:
        con.execute(f"SET threads TO {max(1, min(8, _cpus()))}").fetchall()
        hi = (
            _max_step(published)
            or con.execute(
                f"SELECT max(step) FROM read_parquet({_sql_list(train_files)})"
            ).fetchall()[0][0]
        )
        scale = bins / math.log(max(float(hi or 2), 2.0))
        frames = {}
        for name, files, col in (
            ("train", train_files, "loss_nats"),
            ("val", val_files, "val_loss"),
        ):
            if not files:
                frames[name] = empty.copy()
                continue
            df = con.execute(
                f"""
                WITH a AS MATERIALIZED (
                    SELECT file_index AS f, CAST(floor(ln(step) * {scale!r}) AS BIGINT) AS bin,
                           avg(step) AS step, avg({col}) AS loss,
                           max(step) AS s1, arg_max({col}, step) AS l1
                    FROM read_parquet({_sql_list(files)})
                    WHERE isfinite({col}) AND {col} > 0
                    GROUP BY ALL
                )
                SELECT f, bin, step, loss FROM a
                UNION ALL
                SELECT f, {bins + 1}, arg_max(s1, bin), arg_max(l1, bin) FROM a GROUP BY f
                """
            ).df()
            keys = np.array(list(files.values()), dtype=object)  # file_index: the list's order
            df.insert(0, "run_id", keys[df.pop("f").to_numpy(np.int64)])
            df = df.sort_values(["run_id", "step", "bin"], kind="stable").reset_index(drop=True)
            frames[name] = df[cols]
    finally:
        con.close()
    return {"scale": scale, **frames}


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def cell_bands(curve: pd.DataFrame, fits: pd.DataFrame) -> pd.DataFrame:
    """Seed mean and band per (variant, lr, weight_decay) cell and step bin.

    Means are geometric (the page's axes are logarithmic): `mean` = exp(mean ln L), `lo` /
    `hi` = exp(mean ln L -/+ sd ln L) across the seeds that reach the bin (`n`; sd 0 for
    one seed). Only the bin means are used (not the exact first/last points)."""
    cols = ["variant", "lr", "weight_decay", "bin", "step", "mean", "lo", "hi", "n"]
    if curve.empty or fits.empty:
        return pd.DataFrame(columns=cols)
    ident = fits[["run_id", "variant", "lr", "weight_decay"]].astype(
        {"run_id": "string", "variant": "string", "lr": "float64", "weight_decay": "float64"}
    )
    c = curve[curve["bin"] < curve["bin"].max()]  # not the exact last points
    c = c.astype({"run_id": "string"}).merge(ident, on="run_id", how="inner")
    c = c.assign(logl=np.log(c["loss"].astype(float)))
    g = c.groupby(["variant", "lr", "weight_decay", "bin"], sort=True)
    agg = g.agg(
        step=("step", "mean"),
        m=("logl", "mean"),
        sd=("logl", "std"),
        n=("logl", "size"),
    ).reset_index()
    agg["sd"] = agg["sd"].fillna(0.0)  # one seed: no spread
    agg["mean"] = np.exp(agg["m"])
    agg["lo"] = np.exp(agg["m"] - agg["sd"])
    agg["hi"] = np.exp(agg["m"] + agg["sd"])
    return agg[cols]


# --- H2 within strata ---------------------------------------------------------------------


def _h2_points(fits: pd.DataFrame) -> pd.DataFrame:
    x = pd.to_numeric(fits["alpha_early"], errors="coerce").astype("float64")
    y = pd.to_numeric(fits["best_val_ce"], errors="coerce").astype("float64")
    diverged = fits["outcome"].astype("string").str.lower().eq(DIVERGED).fillna(False)
    ok = np.isfinite(x) & np.isfinite(y) & ~diverged.astype(bool)
    return pd.DataFrame({"variant": fits["variant"], "x": x, "y": y})[ok]


def trend(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares line y = a + b x with Pearson r and n (NaNs under 3 points or a
    constant x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = int(x.size)
    out = {"n": n, "slope": None, "intercept": None, "r": None}
    if n < 3 or np.ptp(x) == 0:
        return out
    b, a = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1] if np.ptp(y) > 0 else math.nan
    out.update(slope=float(b), intercept=float(a), r=None if not np.isfinite(r) else float(r))
    return out


def h2_trends(fits: pd.DataFrame) -> dict:
    """Trend of best_val_ce on alpha_early within each variant, and pooled (shown apart)."""
    if fits.empty or not {"alpha_early", "best_val_ce"} <= set(fits.columns):
        return {"strata": {}, "pooled": trend([], [])}
    p = _h2_points(fits)
    strata = {str(v): trend(g["x"], g["y"]) for v, g in p.groupby("variant", sort=True)}
    return {"strata": strata, "pooled": trend(p["x"], p["y"])}


# --- tables as JSON -----------------------------------------------------------------------


def _cell(v):
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if hasattr(v, "item") and not isinstance(v, str):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, bool | int | str):
        return v
    return str(v)


def records(df: pd.DataFrame | None, columns: list[str] | None = None) -> dict:
    """{"columns": [...], "rows": [[...], ...]}: compact, JSON-safe (NaN/NA -> null)."""
    if df is None:
        return {"columns": [], "rows": []}
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    arrays = []
    for c in cols:
        s = df[c]
        if pd.api.types.is_float_dtype(s.dtype) or str(s.dtype) == "Float64":
            a = pd.to_numeric(s, errors="coerce").astype("float64").to_numpy()
            arrays.append([None if not math.isfinite(v) else float(f"{v:.6g}") for v in a])
        else:
            arrays.append([_cell(v) for v in s.tolist()])
    return {"columns": cols, "rows": [list(r) for r in zip(*arrays, strict=True)]}


def _curve_json(df: pd.DataFrame) -> dict[str, list]:
    """run_id -> [steps..., losses...] flattened as [[t...], [y...]]."""
    out: dict[str, list] = {}
    if df.empty:
        return out
    steps = np.round(df["step"].to_numpy(float), 1)
    loss = np.round(df["loss"].to_numpy(float), DIGITS)
    ids = df["run_id"].astype(str).to_numpy()
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(ids)], strict=True):
        t = steps[lo:hi]
        keep = np.r_[True, np.diff(t) > 0]  # an exact first/last point equal to a bin mean
        out[ids[lo]] = [t[keep].tolist(), loss[lo:hi][keep].tolist()]
    return out


def _bands_json(b: pd.DataFrame, which: str) -> list[dict]:
    out = []
    for (v, lr, wd), g in b.groupby(["variant", "lr", "weight_decay"], sort=True):
        out.append(
            {
                "variant": str(v),
                "lr": float(lr),
                "wd": float(wd),
                "curve": which,
                "t": np.round(g["step"].to_numpy(float), 1).tolist(),
                "m": np.round(g["mean"].to_numpy(float), DIGITS).tolist(),
                "lo": np.round(g["lo"].to_numpy(float), DIGITS).tolist(),
                "hi": np.round(g["hi"].to_numpy(float), DIGITS).tolist(),
                "n": g["n"].astype(int).tolist(),
            }
        )
    return out


def gather(
    *,
    fits: pd.DataFrame | None,
    completeness: pd.DataFrame | None,
    hypotheses: pd.DataFrame | None,
    excluded: pd.DataFrame | None,
    gates: pd.DataFrame | None,
    published: dict[str, Path],
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Everything the page shows, as one dict of plain values."""
    say = progress or (lambda msg: None)
    fits = fits if fits is not None else pd.DataFrame(columns=RUN_COLUMNS)
    missing = {"run_id", "variant", "lr", "weight_decay", "seed"} - set(fits.columns)
    if missing:
        raise ReportInputError(f"run_fits lacks column(s) {', '.join(sorted(missing))}")
    if completeness is not None:
        lacking = {"run_id", "variant", "lr", "weight_decay", "seed", "status"} - set(
            completeness.columns
        )
        if lacking:
            raise ReportInputError(f"completeness lacks column(s) {', '.join(sorted(lacking))}")
    say(f"reading curves of {len(published)} published runs")
    curves = read_curves(published)
    say("seed bands and trends")
    bands = _bands_json(cell_bands(curves["train"], fits), "train") + _bands_json(
        cell_bands(curves["val"], fits), "val"
    )
    variants = sorted(str(v) for v in fits["variant"].dropna().unique())
    if completeness is not None and len(completeness):
        variants = sorted(set(variants) | {str(v) for v in completeness["variant"].dropna()})
    failures = None
    if completeness is not None and len(completeness):
        failures = completeness[completeness["status"].astype("string") != MATERIALIZED]
    cells = [fits] + ([completeness] if completeness is not None else [])
    return {
        "variants": variants,
        "lrs": sorted({float(v) for df in cells for v in df["lr"].dropna()}),
        "wds": sorted({float(v) for df in cells for v in df["weight_decay"].dropna()}),
        "runs": records(fits, RUN_COLUMNS),
        "verdicts": verdicts(hypotheses),
        "gates": gates_by_variant(gates, variants),
        "completeness": records(
            completeness,
            ["run_id", "variant", "lr", "weight_decay", "seed", "status", "attempts", "reason"],
        ),
        "failures": records(failures, ["run_id", "status", "attempts", "reason"]),
        "excluded": records(excluded),
        "h2": h2_trends(fits),
        "train": _curve_json(curves["train"]),
        "val": _curve_json(curves["val"]),
        "bands": bands,
        "bins": n_bins(len(published)),
    }
