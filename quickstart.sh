#!/usr/bin/env bash
# One command on a fresh machine: set up the virtual environment, then run everything on embedded
# defaults (SQLite, in-process classifier): migrate, train the starter model if there is none, serve.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3.11}
if [ ! -x .venv/bin/triage ]; then
    "$python" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch==2.13.0  # first, so the project's range does not pull another build
    .venv/bin/pip install -q -e ".[dev]"
fi
exec .venv/bin/triage up "$@"
