"""Quality gates (GO / NO-GO) of SPEC section 4, evaluated on the published database.

Every logged metric is covered (train and validation loss and accuracy, lr, weight decay,
curvature, gradient noise, gradient and weight norms): value ranges, non-finite values,
and logging frequencies against the *profile's* configuration (``get_profile(profile)``,
not what each run's summary says about itself). Each gate names its offending runs with
their row counts, in ``detail`` and in ``runs``.

Every gate is an error (NO-GO) when it has violations. Validation-loss blow-ups above 10
nats are split by when they happen (before the end of the profile's knee window, epoch 20
of 50, versus later) so a reader sees whether they are the early transient of
high-learning-rate BatchNorm runs, but both rows are NO-GO: a validation CE of 1e5 nats is
at least as serious as a late knee. `gates_by_variant` breaks every gate down per arm of
the sweep (variant), so a verdict names the arms that fail rather than one sweep-wide
NO-GO.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from deconflow.profiles import TrainConfig, get_profile
from deconflow.protocol import COMPLETED, FAMILIES
from deconflow.schedule import Schedule
from deconflow.sweep import GridError, parse_key
from deconflow.warehouse.database import connect_readonly

LOSS_RANGE = (0.0, 10.0)  # nats (SPEC section 4)
GATE_COLUMNS = ["gate", "passed", "severity", "violations", "n_runs", "runs", "detail"]
GATE_DTYPES = {
    "gate": "string",
    "passed": "bool",
    "severity": "string",
    "violations": "int64",
    "n_runs": "int64",
    "runs": "string",
    "detail": "string",
}
ERROR, WARN = "error", "warn"
_SHOW = 10  # runs named in a detail; `runs` lists them all
_LN2 = math.log(2.0)

# Value ranges of SPEC section 3's metrics on finite values: (family, column, SQL condition
# of a bad row, human condition, completed runs only?). Curvature has no natural range
# (power iteration and Hutchinson estimates may be negative); it is checked for finiteness.
RANGES = [
    (
        "batch_metrics",
        "loss_nats",
        "NOT (f.loss_nats BETWEEN 0 AND 10)",
        "train loss in [0, 10]",
        True,
    ),
    (
        "batch_metrics",
        "loss_bits",
        f"isfinite(f.loss_nats) AND abs(f.loss_bits * {_LN2!r} - f.loss_nats) "
        "> 1e-6 * greatest(1, abs(f.loss_nats))",
        "loss_bits = loss_nats / ln 2",
        False,
    ),
    (
        "batch_metrics",
        "accuracy",
        "NOT (f.accuracy BETWEEN 0 AND 1)",
        "train accuracy in [0, 1]",
        False,
    ),
    (
        "batch_metrics",
        "lr",
        "f.lr <= 0 OR f.lr > r.lr * (1 + 1e-9)",
        "lr in (0, the cell's lr]",
        False,
    ),
    (
        "batch_metrics",
        "weight_decay",
        "abs(f.weight_decay - r.weight_decay) > 1e-9 * greatest(abs(r.weight_decay), 1e-300)",
        "weight decay = the cell's",
        False,
    ),
    ("val_metrics", "val_loss", "f.val_loss < 0", "validation loss >= 0", True),
    (
        "val_metrics",
        "val_accuracy",
        "NOT (f.val_accuracy BETWEEN 0 AND 1)",
        "validation accuracy in [0, 1]",
        False,
    ),
    ("val_metrics", "grad_norm", "f.grad_norm < 0", "gradient norm >= 0", False),
    ("val_metrics", "weight_norm", "f.weight_norm <= 0", "weight norm > 0", False),
    (
        "noise_metrics",
        "psd_tail_ratio",
        "NOT (f.psd_tail_ratio BETWEEN 0 AND 1)",
        "PSD tail ratio in [0, 1]",
        False,
    ),
    ("noise_metrics", "grad_variance", "f.grad_variance < 0", "gradient variance >= 0", False),
    ("noise_metrics", "residual_power", "f.residual_power < 0", "residual power >= 0", False),
]
METRIC_COLUMNS = {
    f: [c for c in cols if c not in ("step", "epoch")] for f, cols in FAMILIES.items()
}


def _n(count: int, unit: str) -> str:
    """'1 row', '3 rows' (unit given in the plural)."""
    return f"{count} {unit[:-1] if count == 1 and unit.endswith('s') else unit}"


def _listing(counts: dict[str, int], unit: str | None = "rows") -> str:
    """The first runs with their counts (`unit` None: the runs alone)."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(k if unit is None else f"{k} ({_n(v, unit)})" for k, v in items[:_SHOW])
    more = f", +{len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return shown + more


class _Gates:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(
        self,
        name: str,
        per_run: dict[str, int],
        what: str,
        severity: str = ERROR,
        extra: str = "",
        unit: str | None = "rows",
    ) -> None:
        """One gate: `per_run` maps each offending run to its count of bad `unit`s (None:
        the gate counts runs, one each)."""
        per_run = {k: int(v) for k, v in per_run.items() if v}
        bad = sum(per_run.values())
        runs = _n(len(per_run), "runs")
        if not bad:
            detail = f"{what}: none"
        elif unit is None:
            detail = f"{what}: {runs}{extra}: {_listing(per_run, None)}"
        else:
            detail = f"{what}: {_n(bad, unit)} in {runs}{extra}: {_listing(per_run, unit)}"
        self.rows.append(
            {
                "gate": name,
                "passed": bad == 0 or severity == WARN,
                "severity": severity,
                "violations": bad,
                "n_runs": len(per_run),
                "runs": ", ".join(sorted(per_run)),
                "detail": detail,
            }
        )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=GATE_COLUMNS).astype(GATE_DTYPES)


def _profile(name) -> TrainConfig | None:
    try:
        return get_profile(str(name))
    except GridError:
        return None


def _per_run(df: pd.DataFrame, column: str) -> dict[str, int]:
    return {r: int(n) for r, n in zip(df["run_id"], df[column], strict=True) if n}


def _range_and_finite_counts(con, family: str) -> pd.DataFrame:
    """Per run of `family`: rows breaking each range, and non-finite rows per column."""
    cols = METRIC_COLUMNS[family]
    parts = [
        f'count(*) FILTER (WHERE NOT coalesce(isfinite(f."{c}"), false)) AS "nonfinite_{c}"'
        for c in cols
    ]
    any_bad = " OR ".join(f'NOT coalesce(isfinite(f."{c}"), false)' for c in cols)
    parts.append(f"count(*) FILTER (WHERE {any_bad}) AS nonfinite_rows")
    for fam, col, cond, _, _ in RANGES:
        if fam == family:
            finite = f'isfinite(f."{col}")'
            parts.append(f'count(*) FILTER (WHERE {finite} AND ({cond})) AS "range_{col}"')
    sql = (
        f"SELECT f.run_id, r.outcome, count(*) AS n_rows, {', '.join(parts)} "
        f"FROM {family} f JOIN runs r ON r.run_id = f.run_id "
        "WHERE r.outcome IS NOT NULL GROUP BY f.run_id, r.outcome"
    )
    return con.execute(sql).df()


def _expected_steps(cfg: TrainConfig, epochs: int, spe: int) -> dict[str, set[int]]:
    """The steps each family logs in a run of `epochs` epochs of `spe` steps under `cfg`'s
    frequencies (SPEC section 3, as the profile scales them)."""
    sched = Schedule.of(cfg.replace(epochs=epochs), spe * cfg.batch_size)
    total = sched.total_steps
    every = cfg.hessian_every
    return {
        "batch_metrics": set(range(1, total + 1)),
        "val_metrics": set(sched.val_steps),
        "curvature_metrics": set(range(every, total + 1, every)) if every else set(),
        "noise_metrics": (
            {s for s in sched.val_steps if s % sched.noise_every == 0}
            if sched.noise_every
            else set()
        ),
    }


def _steps_note(steps: Iterable[int]) -> str:
    steps = sorted(steps)
    shown = ", ".join(str(s) for s in steps[:5])
    return shown + (f", ... ({len(steps)})" if len(steps) > 5 else "")


def _frequency_gate(con, gates: _Gates, runs: pd.DataFrame, settings: pd.DataFrame) -> None:
    logged = {
        family: con.execute(f"SELECT run_id, step FROM {family}").df()
        for family in ("val_metrics", "curvature_metrics", "noise_metrics")
    }
    steps_of = {f: df.groupby("run_id")["step"].apply(list).to_dict() for f, df in logged.items()}
    batch = con.execute(
        "SELECT run_id, count(*) AS n, count(DISTINCT step) AS nd, min(step) AS lo, "
        "max(step) AS hi FROM batch_metrics GROUP BY run_id"
    ).df()
    batch = batch.set_index("run_id")
    settings = settings.set_index("run_id")
    per_run: dict[str, int] = {}
    notes: dict[str, list[str]] = {}
    for r in runs.itertuples():
        cfg = _profile(r.profile)
        s = settings.loc[r.run_id] if r.run_id in settings.index else None
        spe = None if s is None or pd.isna(s["steps_per_epoch"]) else int(s["steps_per_epoch"])
        epochs = None if s is None or pd.isna(s["epochs"]) else int(s["epochs"])
        if cfg is None or spe is None or epochs is None:
            per_run[r.run_id] = 1
            notes[r.run_id] = [f"profile {r.profile!r} unknown or run length not recorded"]
            continue
        bad, why = 0, []
        for name in ("val_per_epoch", "hessian_every", "noise_every_epochs"):
            declared = s[name]
            if not pd.isna(declared) and int(declared) != getattr(cfg, name):
                bad += 1
                why.append(f"declares {name}={int(declared)}, profile has {getattr(cfg, name)}")
        expected = _expected_steps(cfg, epochs, spe)
        completed = r.outcome == COMPLETED
        b = batch.loc[r.run_id] if r.run_id in batch.index else None
        n, nd, lo, hi = (0, 0, 0, 0) if b is None else (int(b.n), int(b.nd), int(b.lo), int(b.hi))
        last = hi
        if n != nd or (n and (lo != 1 or hi != n)):
            bad += abs(hi - nd) + (n - nd)
            why.append(f"batch_metrics: steps not 1..{hi} once each ({n} rows, {nd} distinct)")
        if completed and hi != len(expected["batch_metrics"]):
            bad += abs(len(expected["batch_metrics"]) - hi)
            why.append(f"batch_metrics: {hi} steps, expected {len(expected['batch_metrics'])}")
        for family in ("val_metrics", "curvature_metrics", "noise_metrics"):
            got = steps_of[family].get(r.run_id, [])
            want = expected[family] if completed else {s for s in expected[family] if s <= last}
            dup = len(got) - len(set(got))
            extra = set(got) - want
            missing = want - set(got) if completed else set()
            if dup or extra or missing:
                bad += dup + len(extra) + len(missing)
                msg = [f"{len(got)} rows, expected {len(want)}"]
                if missing:
                    msg.append(f"missing steps {_steps_note(missing)}")
                if extra:
                    msg.append(f"off-schedule steps {_steps_note(extra)}")
                if dup:
                    msg.append(f"{dup} duplicates")
                why.append(f"{family}: " + ", ".join(msg))
        if bad:
            per_run[r.run_id] = bad
            notes[r.run_id] = why
    extra = ""
    if notes:
        first = sorted(notes)[: min(3, len(notes))]
        extra = " (" + "; ".join(f"{k}: {'; '.join(notes[k])}" for k in first) + ")"
    gates.add(
        "logging frequencies as the profile configures",
        per_run,
        "missing, off-schedule or duplicate metric rows and settings differing from the "
        "profile's (batch every step, validation val_per_epoch per epoch, curvature every "
        "hessian_every steps, noise every noise_every_epochs epochs; completed runs in full, "
        "diverged runs up to their last step)",
        extra=extra,
        unit="items",
    )


def quality_gates(db_path: Path) -> pd.DataFrame:
    """GO / NO-GO gates of SPEC section 4 on the published database.

    Columns: gate, passed, severity (error | warn), violations (offending rows or items),
    n_runs, runs (every offending run, comma-separated), detail (what, how many, and the
    first runs with their counts). The verdict is GO when every gate passed.
    """
    con = connect_readonly(Path(db_path))
    gates = _Gates()
    try:
        runs = con.execute(
            "SELECT run_id, outcome, profile, steps FROM runs WHERE outcome IS NOT NULL"
        ).df()
        settings = con.execute(
            "SELECT run_id, steps_per_epoch, epochs, val_per_epoch, hessian_every, "
            "noise_every_epochs FROM run_settings"
        ).df()
        counts = {f: _range_and_finite_counts(con, f) for f in FAMILIES}
        completed = {f: df[df["outcome"] == COMPLETED] for f, df in counts.items()}

        # --- value ranges (finite values; non-finite ones are the next gate's) ---
        for family, col, _, what, completed_only in RANGES:
            df = completed[family] if completed_only else counts[family]
            scope = "completed runs" if completed_only else "runs"
            gates.add(what, _per_run(df, f"range_{col}"), f"{family} rows of {scope} breaking it")

        # --- validation loss above 10 nats: early transients vs later blow-ups ---
        high = con.execute(
            "SELECT v.run_id, v.epoch, v.val_loss, r.profile FROM val_metrics v "
            "JOIN runs r ON r.run_id = v.run_id "
            f"WHERE r.outcome = '{COMPLETED}' AND isfinite(v.val_loss) AND v.val_loss > 10"
        ).df()
        early_end = {
            p: (cfg.knee_epochs[1] if (cfg := _profile(p)) else math.inf)
            for p in set(runs["profile"].dropna()) | set(high["profile"].dropna())
        }
        cut = high["profile"].map(early_end).astype(float)
        early, late = high[high["epoch"] < cut], high[~(high["epoch"] < cut)]
        limit = ", ".join(f"{v:g}" for v in sorted(set(early_end.values()))) or "20"
        gates.add(
            "validation loss <= 10 after the early phase",
            late.groupby("run_id").size().to_dict(),
            "validation rows of completed runs above 10 nats from the end of the profile's "
            f"knee window on (epoch {limit})",
        )
        extra = ""
        if len(early):
            extra = (
                f", all before epoch {limit} (the latest at epoch "
                f"{early['epoch'].max():.2f}; up to {early['val_loss'].max():.6g} nats)"
            )
        gates.add(
            "validation blow-ups early in training",
            early.groupby("run_id").size().to_dict(),
            "validation loss > 10 nats early in training (a NO-GO like a late knee)",
            extra=extra,
        )

        # --- no NaN/inf (or missing value) outside diverged runs ---
        per_run: dict[str, int] = {}
        by_column: dict[str, int] = {}
        for family, df in completed.items():
            for r, n in _per_run(df, "nonfinite_rows").items():
                per_run[r] = per_run.get(r, 0) + n
            for c in METRIC_COLUMNS[family]:
                total = int(df[f"nonfinite_{c}"].sum()) if len(df) else 0
                if total:
                    by_column[f"{family}.{c}"] = total
        gates.add(
            "no NaN/inf outside diverged runs",
            per_run,
            "metric rows (all four families, every column) of completed runs with a NaN, "
            "inf or missing value",
            extra=f" (by column: {_listing(by_column)})" if by_column else "",
        )

        # --- knee epoch within the profile's window ([1, 20] of 50 epochs) ---
        fits = con.execute(
            "SELECT f.run_id, f.knee_epoch, r.profile FROM run_fits f "
            f"JOIN runs r ON r.run_id = f.run_id WHERE f.outcome = '{COMPLETED}'"
        ).df()
        bad_knee: dict[str, int] = {}
        knee_notes = []
        windows = set()
        for r in fits.itertuples():
            cfg = _profile(r.profile)
            lo, hi = cfg.knee_epochs if cfg else (1.0, 20.0)
            windows.add(f"[{lo:g}, {hi:g}]")
            knee = float(r.knee_epoch) if not pd.isna(r.knee_epoch) else math.nan
            if not (np.isfinite(knee) and lo <= knee <= hi):
                bad_knee[r.run_id] = 1
                knee_notes.append(
                    f"{r.run_id}: " + ("no burn-in" if np.isnan(knee) else f"knee {knee:.3g}")
                )
        gates.add(
            "knee epoch within the profile's window",
            bad_knee,
            f"completed runs whose burn-in knee is missing or outside epochs "
            f"{', '.join(sorted(windows)) or '[1, 20] (scaled)'}",
            extra=f" ({'; '.join(knee_notes[:_SHOW])})" if knee_notes else "",
            unit=None,
        )

        # --- logging frequencies against the profile ---
        _frequency_gate(con, gates, runs, settings)
    finally:
        con.close()
    return gates.frame()


VARIANT_GATE_COLUMNS = ["variant", "gate", "verdict", "n_runs", "runs"]
VARIANT_GATE_DTYPES = {
    "variant": "string",
    "gate": "string",
    "verdict": "string",
    "n_runs": "int64",
    "runs": "string",
}


def _variant_of(run_id: str) -> str:
    try:
        return parse_key(run_id).variant
    except (GridError, ValueError):
        return run_id.split("__", 1)[0]


def gates_by_variant(gates: pd.DataFrame, variants: Iterable[str] = ()) -> pd.DataFrame:
    """One row per (variant, gate): GO or NO-GO for that arm and the runs of it the gate
    names. Arms differ in kind (bn_off burns in late by design), so a sweep-wide NO-GO
    must say which arms fail. `variants`: every arm of the sweep (those no gate names
    still get their GO rows); a warn-severity gate never makes an arm NO-GO."""
    named: dict[tuple[str, str], list[str]] = {}
    for g in gates.itertuples():
        runs = [r.strip() for r in str(g.runs or "").split(",") if r.strip()]
        for r in runs:
            named.setdefault((_variant_of(r), str(g.gate)), []).append(r)
    arms = sorted(set(variants) | {v for v, _ in named})
    rows = []
    for v in arms:
        for g in gates.itertuples():
            runs = sorted(named.get((v, str(g.gate)), []))
            bad = bool(runs) and g.severity != WARN
            rows.append(
                {
                    "variant": v,
                    "gate": str(g.gate),
                    "verdict": "NO-GO" if bad else "GO",
                    "n_runs": len(runs),
                    "runs": ", ".join(runs),
                }
            )
    return pd.DataFrame(rows, columns=VARIANT_GATE_COLUMNS).astype(VARIANT_GATE_DTYPES)


def failing_arms(by_variant: pd.DataFrame) -> dict[str, list[str]]:
    """{variant: [gates it fails]} for the arms with a NO-GO, in variant order."""
    bad = by_variant[by_variant["verdict"] == "NO-GO"]
    return {str(v): list(g["gate"]) for v, g in bad.groupby("variant", sort=True)}


def sweep_variants(db_path: Path) -> list[str]:
    """The variants of the published `runs` table (every arm, failing or not)."""
    con = connect_readonly(Path(db_path))
    try:
        return [
            r[0] for r in con.execute("SELECT DISTINCT variant FROM runs ORDER BY 1").fetchall()
        ]
    finally:
        con.close()
