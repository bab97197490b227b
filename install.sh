#!/usr/bin/env bash
# Fresh machine → working lookalike: virtual environment, package, pretrained weights, then the main job
# on the bundled sample photos. Re-running is cheap: what is installed or cached is kept.
#   bash install.sh            install + weights + demo
#   bash install.sh --no-demo  install + weights only (used by test.sh)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
MODELS=${LOOKALIKE_MODELS:-"resnet50.keras-imagenet efficientnet-lite0.imagenet xfeat.verlab"}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml: a CPU wheel (never the multi-GB CUDA build).
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq npm >/dev/null) || echo "npm could not be installed" >&2
fi
# Debian's Chromium, for the web page's browser test (tests/test_browser.py drives it with Playwright).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed" >&2
fi
# shellcheck disable=SC2086
.venv/bin/lookalike models pull $MODELS

if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/lookalike system
  .venv/bin/lookalike classify src/lookalike/sample/cat.jpg
  # The main job: index a folder of photos, then ask what looks like a query photo.
  .venv/bin/lookalike index src/lookalike/sample --collection .demo/sample-collection
  .venv/bin/lookalike search src/lookalike/sample/cat.jpg --collection .demo/sample-collection -k 5
fi
