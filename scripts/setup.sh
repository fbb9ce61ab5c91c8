#!/usr/bin/env bash
# Set up deconflow on a fresh machine: Python packages (CPU torch pinned here so pip
# never pulls the multi-GB CUDA build) and, with --slurm, Debian's SLURM packages for
# the local one-node cluster the SLURM tests run against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU)"
  "$PY" -m pip install -q torch==2.13.0
fi
echo "setup: installing deconflow and its dependencies"
"$PY" -m pip install -q -e ".[dev]"
# pip's console scripts (deconflow, duckdb) behind pyenv's shims, where pyenv is used.
if command -v pyenv >/dev/null; then pyenv rehash || true; fi
echo "setup: duckdb CLI $(duckdb --version 2>/dev/null || echo 'missing: pip install duckdb-cli')"

if [ "${1:-}" = "--slurm" ]; then
  # What the tests start for real: a one-node SLURM cluster (slurm-wlm, munge, slurmdbd,
  # MariaDB), a PostgreSQL server for the production Dagster instance, and Chromium for the
  # tests that look at the sweep report as a user does.
  if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null \
     || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null \
     || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing slurm-wlm, munge, slurmdbd, mariadb-server, postgresql, chromium"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurm-wlm munge slurmdbd mariadb-server postgresql chromium >/dev/null
    else
      echo "setup: system packages missing and not root with apt-get; their tests fail" >&2
    fi
  fi
fi
echo "setup: done"
