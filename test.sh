#!/usr/bin/env bash
# The test command: installs what a fresh machine lacks (see install.sh), then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash test.sh -m "not slow"` for the quick loop.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh --no-demo
exec .venv/bin/python -m pytest "$@"
