"""Every command line in README.md and docs/*.md works as written.

Command lines are the lines of fenced ``bash``/``sh``/``shell``/``console`` blocks (a
trailing backslash continues a line; ``#`` comments are dropped), wherever they are in the
files: the README can be restructured freely. Two tests:

- fast: every command is checked without running it: `deconflow ...` parses with the real
  argument parser, `python -m X` names an importable module, `bash FILE` passes `bash -n`,
  every other program is on PATH (`duckdb` included: setup installs it);
- slow: the commands run, in document order, in a fresh copy of the repository set up by
  ``scripts/setup.sh`` into its own virtualenv, each under a timeout.

Conventions for the slow test (say so in the document's own words, no markers needed):

- a command that serves (``deconflow dev``, ``dagster dev``) passes when it is still up
  after ``SERVE_S`` seconds (then it is stopped); any other command gets ``LONG_S``
  (set-up and the demo, which the later commands need, ``SETUP_S``) and passes if it is
  still working without an error at its timeout (a 54-cell backfill has started fine);
  trainings run one epoch (``DECONFLOW_TRAIN_OVERRIDES``) on a 16-cell grid holding every
  cell the documents name (``DECONFLOW_GRID``), the same code path; a command repeated in
  another place (``deconflow dev``), or repeated for another cell, runs once;
- a command that names a lab's own resources (a host under ``example``, ``/shared/``,
  ``~/data/``, the ``full`` profile's CIFAR-10) or starts services shared by the machine
  (``deconflow slurm``/``postgres``), the whole test suite (pytest) or the benchmarks is
  checked by the fast test only; add ``# doc-test: skip`` to a line to say so explicitly.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*```\s*(bash|sh|shell|console)\s*$")
SERVE_S = 30
LONG_S = 60
SETUP_S = 1200
# Trainings of one epoch on a small grid that holds every cell the documents name: the
# commands run as written, on the same code path, in minutes (the suite's 15-minute budget).
TINY = '{"epochs": 1}'
SMALL_GRID = """name = "doc-commands"
variants = ["base", "bn_off", "narrow", "adamw"]
lr = [0.1, 0.2]
weight_decay = [0.0001]
seed = [0, 1]
"""
LAB_ONLY = re.compile(
    r"doc-test: skip|example\b|/shared/|~/data/|--profile full|deconflow (slurm|postgres)"
    r"|\bpytest\b|bench\.|slurm env|ruff "
)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every command line in the fenced shell blocks of ``path``."""
    out, inside, pending, start = [], False, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            inside = bool(FENCE.match(line)) and not inside
            continue
        if not inside:
            continue
        text = line.strip()
        if text.startswith("$ "):
            text = text[2:]
        if not pending:
            start = n
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        full = (pending + text).strip()
        pending = ""
        if full and not full.startswith("#"):
            out.append((start, full))
    return out


def all_commands() -> list[tuple[str, str]]:
    return [(f"{p.relative_to(REPO)}:{n}", cmd) for p in documents() for n, cmd in command_lines(p)]


def _strip_comment(cmd: str) -> str:
    return shlex.join(shlex.split(cmd, comments=True))


CELL_KEY = re.compile(r"\b[a-z_]+__lr[0-9.e-]+_wd[0-9.e-]+_s[0-9]+\b")
PARTITION = re.compile(r"\blr[0-9.e-]+_wd[0-9.e-]+_s[0-9]+\|[a-z_]+\b")


def _shape(cmd: str) -> str:
    """A command with its cell keys and partition keys blanked: two documented lines of one
    shape (the runbook's rerun of another cell) run the same code."""
    return PARTITION.sub("<partition>", CELL_KEY.sub("<cell>", _strip_comment(cmd)))


def _simple_commands(cmd: str) -> list[list[str]]:
    """The simple commands of one line: split on && || ; | and unwrap eval "$(...)"."""
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words, out = [], []
    for tok in lexer:
        if set(tok) <= set(";&|"):
            out.append(words)
            words = []
        else:
            words.append(tok)
    out.append(words)
    cmds = []
    for words in out:
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]  # VAR=value prefixes
        if words[:1] == ["eval"] and len(words) == 2:
            inner = words[1].strip()
            if inner.startswith("$(") and inner.endswith(")"):
                cmds += _simple_commands(inner[2:-1])
                continue
        if words:
            cmds.append(words)
    return cmds


def check_statically(words: list[str]) -> str | None:
    """Why ``words`` cannot work as written (None: it can)."""
    prog, args = words[0], words[1:]
    if prog in ("export", "cd", "true"):
        return None
    if prog == "deconflow":
        from deconflow.cli import build_parser

        if args[:1] == ["dev"]:
            return None  # everything after `dev` belongs to dagster dev
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            return f"deconflow refuses these arguments (exit {e.code})"
        return None
    if prog in ("python", "python3") and args[:1] == ["-m"]:
        if importlib.util.find_spec(args[1]) is None:
            return f"no module {args[1]}"
        return None
    if prog == "bash" and args and not args[0].startswith("-"):
        f = REPO / args[0]
        if not f.exists():
            return f"no file {args[0]}"
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        return r.stderr.strip() or None
    if shutil.which(prog) is None:
        return f"{prog}: command not found (setup should install it)"
    if prog == "duckdb":
        r = subprocess.run([prog, "-c", "SELECT 1"], capture_output=True)
        if r.returncode != 0:
            return "the duckdb CLI does not run"
        db = [a for a in args if a.endswith(".duckdb")]
        if any("/" in a for a in db) and not any("file_search_path" in a for a in args):
            # The metric views name their Parquet parts relative to the data folder.
            return "open it in the data folder: cd data && duckdb -readonly deconflow.duckdb"
    return None


def test_documents_have_commands():
    cmds = all_commands()
    assert len(cmds) >= 10
    assert any("deconflow sql" in c for _, c in cmds)


@pytest.mark.parametrize("where,cmd", all_commands(), ids=lambda x: x[:60])
def test_every_documented_command_can_work_as_written(where, cmd):
    problems = [p for words in _simple_commands(cmd) if (p := check_statically(words))]
    assert problems == [], f"{where}: {cmd}"


def _run(cmd: str, cwd: Path, env: dict, timeout: float) -> tuple[bool, str]:
    serving = re.search(r"\b(deconflow|dagster) dev\b", cmd) is not None
    proc = subprocess.Popen(
        ["bash", "-c", cmd],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL if "duckdb" not in cmd else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    # An interactive duckdb gets a query on its input, then end of input.
    query = "SELECT count(*) FROM batch_metrics;\n" if proc.stdin is not None else None
    try:
        out, _ = proc.communicate(query, timeout=SERVE_S if serving else timeout)
        return proc.returncode == 0, out[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        healthy = "Traceback" not in out and "error:" not in out
        return serving or healthy, f"(stopped after the timeout) {out[-3000:]}"


def _children_cpu() -> float:
    import resource

    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


@pytest.mark.slow
def test_documented_commands_run_on_a_fresh_setup(tmp_path):
    """A fresh copy of the repository (its tracked files), set up by scripts/setup.sh into
    its own virtualenv (system packages visible: nothing is downloaded twice), then every
    runnable command in document order."""
    fresh = tmp_path / "deconflow"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (fresh / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, fresh / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DECONFLOW_", "DAGSTER_"))}
    env.pop("PYTHONPATH", None)
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", PYTHON=str(venv / "bin" / "python3"))
    env["VIRTUAL_ENV"] = str(venv)
    env["DECONFLOW_TRAIN_OVERRIDES"] = TINY
    (tmp_path / "grid.toml").write_text(SMALL_GRID)
    env["DECONFLOW_GRID"] = str(tmp_path / "grid.toml")
    failures, seen, times = [], set(), []
    t0 = time.monotonic()
    for where, cmd in all_commands():
        key = _shape(cmd)
        if LAB_ONLY.search(cmd) or key in seen:
            continue  # a lab's own resources, or a command of a shape already run
        seen.add(key)
        first = re.search(r"setup\.sh|deconflow demo", cmd) is not None
        t, cpu = time.monotonic(), _children_cpu()
        ok, out = _run(cmd, fresh, env, timeout=SETUP_S if first else LONG_S)
        took = f"{time.monotonic() - t:5.0f} s ({_children_cpu() - cpu:4.0f} s CPU)"
        times.append(f"{took}  {where}: {key[:70]}")
        if not ok:
            failures.append(f"{where}: {cmd}\n{out}")
    assert len(seen) >= 5 and failures == [], "\n\n".join(failures + times)
    print(f"{len(seen)} documented commands ran in {time.monotonic() - t0:.0f} s:")
    print("\n".join(times))
