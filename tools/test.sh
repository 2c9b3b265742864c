#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every CTest suite (GPU suites skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure --timeout 900 "$@"
