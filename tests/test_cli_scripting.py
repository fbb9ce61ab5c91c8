"""The CLI as a scripting user expects it: no torch outside `train`, --version, JSON/CSV
output, help for every command and flag, one-line errors for every bad value."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deconflow.cli import build_parser, main
from tests.sharing_pipeline import write_sweep

REPO = Path(__file__).resolve().parents[1]
KEY = "base__lr0.1_wd0.0001_s0"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DECONFLOW_", "DAGSTER_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deconflow.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(**env),
        timeout=120,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    data = tmp_path_factory.mktemp("project") / "data"
    write_sweep(data, 2)
    return data


# Every command but train, as a script would run it (some end in a one-line refusal).
NO_TORCH = [
    ["--help"],
    ["--version"],
    ["grid"],
    ["sql", "--help"],
    ["sql", "SELECT count(*) FROM runs_nope"],
    ["status"],
    ["status", "--json"],
    ["materialize", "--workers", "0"],
    ["demo", "--workers", "0"],
    ["slurm", "--help"],
    ["postgres", "--help"],
]


def test_commands_other_than_train_import_no_torch(project):
    code = (
        "import sys, json\n"
        "from deconflow.cli import main\n"
        "rc = None\n"
        "try:\n"
        "    rc = main(json.loads(sys.argv[1]))\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print('TORCH', 'torch' in sys.modules, rc, file=sys.stderr)\n"
    )
    for args in NO_TORCH:
        r = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            capture_output=True,
            text=True,
            cwd=project.parent,
            env=_env(DAGSTER_HOME=str(project.parent / "home")),
            timeout=120,
        )
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("TORCH False"), (args, r.stderr[-2000:])


def test_version():
    r = _cli(["--version"], REPO)
    assert r.returncode == 0 and r.stdout.startswith("deconflow ")


def _walk(parser: argparse.ArgumentParser, path: str = "deconflow"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", "command", helps.get(name)
                yield f"{path} {name}", "description", sub.description
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield (
                path,
                action.option_strings[0] if action.option_strings else action.dest,
                (action.help),
            )


def test_every_command_and_flag_has_help():
    missing = [f"{where}: {what}" for where, what, text in _walk(build_parser()) if not text]
    assert missing == []
    # `rest` is explained, not an unexplained positional.
    for cmd in ("slurm", "postgres"):
        out = _cli([cmd, "--help"], REPO).stdout
        assert "OPTIONS" in out and "options of the" in out


def test_status_outside_a_project_refuses_in_one_line_and_writes_nothing(tmp_path):
    r = _cli(["status"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no deconflow data folder" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_status_json(project, monkeypatch, capsys):
    monkeypatch.setenv("DECONFLOW_DATA", str(project))
    monkeypatch.setenv("DAGSTER_HOME", str(project / "dagster_home"))
    assert main(["status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cells"] == 216 == len(out["runs"]) == sum(out["totals"].values())
    assert out["totals"]["materialized"] == 2
    assert {"run_id", "status", "variant"} <= set(out["runs"][0])


def test_sql_formats_and_multiple_statements(project, monkeypatch, capsys):
    monkeypatch.setenv("DECONFLOW_DATA", str(project))
    monkeypatch.delenv("DECONFLOW_DB", raising=False)
    q = "SELECT run_id, best_val_ce FROM run_fits ORDER BY 1"
    assert main(["sql", "--format", "json", q]) == 0
    rows = json.loads(capsys.readouterr().out)
    import pandas as pd

    saved = pd.read_parquet(project / "tables" / "run_fits.parquet").sort_values("run_id")
    assert [r["run_id"] for r in rows] == list(saved["run_id"])
    assert [r["best_val_ce"] for r in rows] == pytest.approx(list(saved["best_val_ce"]))
    assert main(["sql", "--format", "csv", q]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "run_id,best_val_ce"
    # Several statements: every result is shown, in order.
    assert main(["sql", "SELECT 1 AS first; SELECT 2 AS second"]) == 0
    out = capsys.readouterr().out
    assert "first" in out and "second" in out and out.index("first") < out.index("second")
    # ... or refused where one result is expected.
    assert main(["sql", "--format", "json", "SELECT 1; SELECT 2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one SQL statement" in err
    assert main(["sql", "--max-rows", "-1", q]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-rows" in err


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"DECONFLOW_TORCH_THREADS": "-2"}, "DECONFLOW_TORCH_THREADS"),
        ({"DECONFLOW_TORCH_THREADS": "many"}, "DECONFLOW_TORCH_THREADS"),
        ({"DECONFLOW_PROFILE": "huge"}, "DECONFLOW_PROFILE"),
        ({"DECONFLOW_TRAIN_OVERRIDES": "{epochs: 3"}, "DECONFLOW_TRAIN_OVERRIDES"),
        ({"DECONFLOW_TRAIN_OVERRIDES": "[3]"}, "DECONFLOW_TRAIN_OVERRIDES"),
        ({"DECONFLOW_TRAIN_OVERRIDES": '{"epochz": 3}'}, "DECONFLOW_TRAIN_OVERRIDES"),
        ({"DECONFLOW_TRAIN_OVERRIDES": '{"epochs": "3"}'}, "DECONFLOW_TRAIN_OVERRIDES"),
        ({"DECONFLOW_TRAIN_OVERRIDES": '{"epochs": 0}'}, "DECONFLOW_TRAIN_OVERRIDES"),
        ({"DECONFLOW_TRAIN_OVERRIDES": '{"bf16": "yes"}'}, "DECONFLOW_TRAIN_OVERRIDES"),
    ],
)
def test_train_refuses_bad_settings_in_one_line(tmp_path, env, needle):
    r = _cli(["train", "--key", KEY], tmp_path, **env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_flags_are_one_line_errors_too(tmp_path):
    r = _cli(["train", "--key", KEY, "--profile", "huge"], tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "huge" in r.stderr
