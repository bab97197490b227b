#!/usr/bin/env bash
# The test command: installs what a fresh machine lacks (see install.sh), checks lint, formatting and types,
# then runs the whole suite; any failing step fails the command. Extra arguments go to pytest, e.g.
# `bash test.sh -m "not slow"` for the quick loop.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh --no-demo
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy src
# The weights install.sh pulls must be there: tests that need them fail instead of skipping.
export LOOKALIKE_REQUIRE_WEIGHTS=${LOOKALIKE_MODELS:-"resnet50.keras-imagenet efficientnet-lite0.imagenet"}
exec .venv/bin/python -m pytest "$@"
