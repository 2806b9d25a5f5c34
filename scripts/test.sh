#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${MUSICSTEER_VENV:-.venv}
exec "$venv/bin/python" -m pytest -q "$@"
