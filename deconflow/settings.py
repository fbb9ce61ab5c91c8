"""Every ``DECONFLOW_*`` setting in one typed table: name, type, default, limits, meaning.

Modules ask this one for a value (``settings.get("DECONFLOW_TRAINING_SLOTS")``) instead of
reading the environment: a bad value is a one-line :class:`SettingError` that names the
variable, whoever asks. ``docs/configuration.md`` is generated from :data:`SETTINGS`
(``python3 -m deconflow.settings --markdown``; a test keeps it in sync).

Where things live: everything defaults to ``data/`` under the working directory.
``DECONFLOW_DATA`` moves the whole data folder; ``DECONFLOW_DB`` just the DuckDB file.

No imports beyond the standard library: the CLI, the orchestrator and the training
program all read their settings here, and none of them pays for torch or dagster.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SettingError(ValueError):
    """A ``DECONFLOW_*`` variable with a value that cannot be used (one line, names it)."""


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # path | str | int | float | bool | choice | json | url
    default: Any
    doc: str
    group: str
    low: float | None = None  # inclusive lower bound for int / float
    choices: tuple[str, ...] = ()
    secret: bool = False


def _s(name, kind, default, doc, group, **kw) -> Setting:
    return Setting(name, kind, default, doc, group, **kw)


_PATHS = "Where things live"
_TRAIN = "Training"
_ORCH = "Orchestration (Dagster instance, sensors)"
_DB = "DuckDB warehouse"
_DEV = "Development services (deconflow slurm / postgres)"
_W = "DECONFLOW_WATCHDOG_"
_A = "DECONFLOW_ANALYSIS_"

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        _s(
            "DECONFLOW_DATA",
            "path",
            "data",
            "the data folder (runs, tables, DuckDB, Dagster "
            "home); relocatable: copy or move it and point this at the new place",
            _PATHS,
        ),
        _s(
            "DECONFLOW_DB",
            "path",
            None,
            "the DuckDB file users query (default "
            "$DECONFLOW_DATA/deconflow.duckdb); its warehouse folder sits next to it",
            _PATHS,
        ),
        _s(
            "DECONFLOW_GRID",
            "path",
            None,
            "the grid file (TOML; default: the packaged grid.toml)",
            _PATHS,
        ),
        _s(
            "DECONFLOW_PROFILE",
            "choice",
            "demo",
            "training profile of the sweep and of "
            "`deconflow train` (sizes only, never the code path)",
            _TRAIN,
            choices=("full", "demo", "synthetic"),
        ),
        _s(
            "DECONFLOW_TRAIN_OVERRIDES",
            "json",
            "{}",
            "JSON object of TrainConfig fields "
            'over the profile, e.g. {"epochs": 3}; unknown keys and wrong types are refused',
            _TRAIN,
        ),
        _s(
            "DECONFLOW_TORCH_THREADS",
            "int",
            None,
            "torch threads of a training process (local runs set 1)",
            _TRAIN,
            low=1,
        ),
        _s(
            "DECONFLOW_FAULT",
            "str",
            "",
            "fault injection for reliability tests: nan@STEP, oom@STEP, crash@STEP or hang@STEP",
            _TRAIN,
        ),
        _s(
            "DECONFLOW_COMPUTE",
            "choice",
            "local",
            "where runs execute",
            _ORCH,
            choices=("local", "slurm"),
        ),
        _s(
            "DECONFLOW_SLURM_CONFIG",
            "path",
            None,
            "TOML file of SLURM settings (a [slurm] table) for DECONFLOW_COMPUTE=slurm",
            _ORCH,
        ),
        _s(
            "DECONFLOW_PG_URL",
            "url",
            None,
            "PostgreSQL URL of the Dagster instance "
            "(postgresql://user:password@host:port/db); unset: SQLite in the data folder. "
            "dagster.yaml, which then holds it, stays mode 0600",
            _ORCH,
            secret=True,
        ),
        _s(
            "DECONFLOW_TRAINING_SLOTS",
            "int",
            2,
            "training runs in flight at once (GPU slots)",
            _ORCH,
            low=1,
        ),
        _s(
            "DECONFLOW_SLURM_QUEUE_DEPTH",
            "int",
            None,
            "SLURM only: training runs in flight beyond the slots, their jobs PENDING in "
            "SLURM's queue so the next cell starts the moment a slot frees (unset: the "
            "training slots, at most 16; 0: off; docs/slurm.md)",
            _ORCH,
            low=0,
        ),
        _s(
            "DECONFLOW_ANALYSIS_SLOTS",
            "int",
            2,
            "other runs at once (analysis, export)",
            _ORCH,
            low=1,
        ),
        _s(
            "DECONFLOW_RUN_START_TIMEOUT_S",
            "int",
            180,
            "seconds a launched run may take to start before Dagster's run monitoring fails "
            "it (the watchdog then retries it): what a run launched just before the "
            "orchestrator died waits",
            _ORCH,
            low=10,
        ),
        _s(
            "DECONFLOW_OWNERS",
            "str",
            "team:deconflow",
            "asset owners, comma-separated e-mails or team:<name>",
            _ORCH,
        ),
        _s(
            "DECONFLOW_ALERT_WEBHOOK",
            "str",
            None,
            "URL that receives each alert as JSON (unset: no webhook)",
            _ORCH,
        ),
        _s(
            _A + "TICK_S",
            "float",
            15.0,
            "analysis refresh sensor: seconds between ticks",
            _ORCH,
            low=0,
        ),
        _s(
            _A + "MIN_INTERVAL_S",
            "float",
            30.0,
            "analysis refresh: least seconds between two requests",
            _ORCH,
            low=0,
        ),
        _s(
            _A + "SETTLE_S",
            "float",
            10.0,
            "analysis refresh: wait while landings are younger than this",
            _ORCH,
            low=0,
        ),
        _s(
            _A + "MAX_WAIT_S",
            "float",
            60.0,
            "analysis refresh: never wait longer than this after a landing",
            _ORCH,
            low=0,
        ),
        _s(
            _A + "RETRY_AFTER_S",
            "float",
            300.0,
            "analysis refresh: retry a failed analysis after this long",
            _ORCH,
            low=0,
        ),
        _s(
            _W + "STUCK_AFTER_S",
            "float",
            3600.0,
            "watchdog: heartbeat age that makes a run stuck",
            _ORCH,
            low=0,
        ),
        _s(
            _W + "NO_PROGRESS_AFTER_S",
            "float",
            3600.0,
            "watchdog: seconds without a new step that make a run stuck",
            _ORCH,
            low=0,
        ),
        _s(
            _W + "SLOW_AFTER_S",
            "float",
            3600.0,
            "watchdog: age after which a run must be "
            "past SLOW_BEFORE_EPOCH / SLOW_OF_EPOCHS of its steps",
            _ORCH,
            low=0,
        ),
        _s(_W + "SLOW_BEFORE_EPOCH", "float", 5.0, "watchdog: see SLOW_AFTER_S", _ORCH, low=0),
        _s(_W + "SLOW_OF_EPOCHS", "float", 50.0, "watchdog: see SLOW_AFTER_S", _ORCH, low=0),
        _s(
            _W + "QUEUED_AFTER_S",
            "float",
            6 * 3600.0,
            "watchdog: report (never cancel) a run queued this long",
            _ORCH,
            low=0,
        ),
        _s(
            _W + "FAILURE_RATE",
            "float",
            0.10,
            "watchdog: alert when the sweep's failure rate passes this",
            _ORCH,
            low=0,
        ),
        _s(
            _W + "MIN_CELLS_FOR_RATE",
            "int",
            10,
            "watchdog: finished cells before the failure rate counts",
            _ORCH,
            low=0,
        ),
        _s(_W + "OOM_RETRIES", "int", 3, "watchdog: retries of an out-of-memory run", _ORCH, low=0),
        _s(
            _W + "RESUME_RETRIES",
            "int",
            3,
            "watchdog: resumes after a time limit or preemption",
            _ORCH,
            low=0,
        ),
        _s(
            _W + "UNKNOWN_RETRIES",
            "int",
            1,
            "watchdog: retries of an unclassified failure",
            _ORCH,
            low=0,
        ),
        _s(
            _W + "CORRUPT_RETRIES",
            "int",
            1,
            "watchdog: fresh restarts after a corrupt checkpoint",
            _ORCH,
            low=0,
        ),
        _s(
            _W + "CONFIRM_DIVERGED",
            "bool",
            False,
            "watchdog: one confirmation rerun of a diverged run (1/true/0/false)",
            _ORCH,
        ),
        _s(_W + "INTERVAL_S", "int", 30, "watchdog: seconds between sensor ticks", _ORCH, low=1),
        _s(
            "DECONFLOW_DB_SEGMENT_CELLS",
            "int",
            32,
            "cells merged into one Parquet file per family (compaction); at least 2",
            _DB,
            low=2,
        ),
        _s(
            "DECONFLOW_DB_RETAIN_S",
            "float",
            6 * 3600.0,
            "seconds a part no current cell uses stays for sessions open on an older publication",
            _DB,
            low=0,
        ),
        _s(
            "DECONFLOW_DB_COMPACT_BUDGET_S",
            "float",
            10.0,
            "seconds of compaction after each publication (0: none)",
            _DB,
            low=0,
        ),
        _s(
            "DECONFLOW_DB_LOCK_TIMEOUT_S",
            "float",
            600.0,
            "seconds a publication waits for another DuckDB writer",
            _DB,
            low=0,
        ),
        _s(
            "DECONFLOW_PORT_BASE",
            "int",
            None,
            "first port of the dev services' block (default: chosen per checkout)",
            _DEV,
            low=1,
        ),
        _s("DECONFLOW_PG_PORT", "int", None, "port of the dev PostgreSQL server", _DEV, low=1),
        _s("DECONFLOW_PG_DIR", "path", None, "state folder of the dev PostgreSQL server", _DEV),
        _s(
            "DECONFLOW_SLURM_DIR",
            "path",
            None,
            "state folder of the dev SLURM cluster (default $DECONFLOW_DATA/slurm)",
            _DEV,
        ),
        _s("DECONFLOW_SLURM_GPUS", "int", 4, "GPUs the dev SLURM node declares", _DEV, low=0),
        _s(
            "DECONFLOW_SLURM_SHARDS",
            "int",
            8,
            "GPU shards the dev SLURM node declares",
            _DEV,
            low=0,
        ),
        _s("DECONFLOW_SLURM_CPUS", "int", 0, "CPUs of the dev SLURM node (0: all)", _DEV, low=0),
    ]
}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _bad(s: Setting, want: str, raw: str) -> SettingError:
    return SettingError(f"{s.name} must be {want}, got {raw!r}")


def parse(name: str, raw: str | None) -> Any:
    """The typed value of ``raw`` for setting ``name`` (None/empty: the default)."""
    s = SETTINGS[name]
    if raw is None or (raw == "" and s.kind != "str"):
        return json.loads(s.default) if s.kind == "json" else s.default
    if s.kind in ("str", "url"):
        if s.kind == "url":
            scheme, sep, _ = raw.partition("://")
            if not sep or scheme not in ("postgres", "postgresql", "postgresql+psycopg2"):
                raise _bad(s, "a URL like postgresql://user:password@host:port/db", raw)
        return raw
    if s.kind == "path":
        return Path(raw).expanduser()
    if s.kind == "choice":
        if raw not in s.choices:
            raise _bad(s, "one of " + ", ".join(s.choices), raw)
        return raw
    if s.kind == "bool":
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise _bad(s, "1/true or 0/false", raw)
    if s.kind == "json":
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SettingError(f"{s.name} is not valid JSON ({e.msg}), got {raw!r}") from None
        if not isinstance(value, dict):
            raise _bad(s, "a JSON object", raw)
        return value
    if s.kind == "int":
        try:
            value = int(raw.strip())
        except ValueError:
            raise _bad(s, "a whole number", raw) from None
    else:
        try:
            value = float(raw)
        except ValueError:
            raise _bad(s, "a number", raw) from None
        if not math.isfinite(value):
            raise _bad(s, "a finite number", raw)
    if s.low is not None and value < s.low:
        raise _bad(s, f"{'a whole number' if s.kind == 'int' else 'a number'} >= {s.low:g}", raw)
    return value


def get(name: str, environ=None) -> Any:
    """The value of setting ``name`` from the environment, checked (one-line errors)."""
    env = os.environ if environ is None else environ
    return parse(name, env.get(name))


def raw(name: str, environ=None) -> str:
    """The unparsed text of setting ``name`` (its default as text when unset), for a
    consumer that checks it itself and reports the variable's name (e.g. SweepSettings)."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None:
        d = SETTINGS[name].default
        return "" if d is None else str(d)
    return value


def check_all(environ=None) -> None:
    """Parse every setting that is set: the first bad one raises."""
    for name in SETTINGS:
        get(name, environ)


# --- where things live --------------------------------------------------------------------


def data_root() -> Path:
    return Path(get("DECONFLOW_DATA")).resolve()


def db_path() -> Path:
    env = get("DECONFLOW_DB")
    return Path(env).resolve() if env else data_root() / "deconflow.duckdb"


def runs_dir(root: Path | None = None) -> Path:
    """Published runs: one folder per cell key, replaced whole when a cell is re-run."""
    return (root or data_root()) / "runs"


def work_dir(root: Path | None = None) -> Path:
    """Attempts in progress: checkpoints, partial metrics, logs, Pipes files."""
    return (root or data_root()) / "work"


def tables_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "tables"


def export_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "export"


# --- the generated reference ---------------------------------------------------------------


def _default_text(s: Setting) -> str:
    if s.default is None:
        return "unset"
    if s.kind == "bool":
        return "false" if not s.default else "true"
    if isinstance(s.default, float):
        return f"{s.default:g}"
    return str(s.default) if s.default != "" else '""'


def _type_text(s: Setting) -> str:
    if s.kind == "choice":
        return " \\| ".join(f"`{c}`" for c in s.choices)
    base = {"json": "JSON object", "url": "PostgreSQL URL", "bool": "boolean"}.get(s.kind, s.kind)
    return base + (f" >= {s.low:g}" if s.low is not None else "")


def markdown() -> str:
    """docs/configuration.md: every setting, grouped, from :data:`SETTINGS`."""
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by `python3 -m deconflow.settings --markdown > docs/configuration.md`"
        "; do not edit (tests/test_settings.py checks it) -->",
        "",
        "Every setting is an environment variable, read and checked by `deconflow/settings.py`."
        " A bad value is a one-line error that names the variable.",
    ]
    groups: dict[str, list[Setting]] = {}
    for s in SETTINGS.values():
        groups.setdefault(s.group, []).append(s)
    for group, items in groups.items():
        out += [
            "",
            f"## {group}",
            "",
            "| variable | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        for s in items:
            doc = s.doc.replace("|", "\\|")
            out.append(f"| `{s.name}` | {_type_text(s)} | {_default_text(s)} | {doc} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown())
    else:
        try:
            check_all()
        except SettingError as e:
            sys.exit(f"deconflow: error: {e}")
        for n in SETTINGS:
            if n in os.environ:
                print(f"{n}={'***' if SETTINGS[n].secret else os.environ[n]}")
