#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs every check CI runs:
#   1. the build (tools/setup.sh) and every CTest suite (GPU suites skip without a GPU), run last so that
#      CTest's summary closes the output;
#   2. the CPU suites under AddressSanitizer + UndefinedBehaviorSanitizer and the threaded ones under
#      ThreadSanitizer (tools/sanitize.sh, its own build folders);
#   3. each fuzz target of the file readers for VB_FUZZ_SECONDS (default 20) under ASan + UBSan
#      (tools/fuzz.sh; the long runs are recorded in docs/STATUS.md).
# Environment: VB_SKIP_SANITIZE=1 / VB_SKIP_FUZZ=1 leave out step 2 / 3 (for a quick local run); BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash tools/setup.sh
if [ "${VB_SKIP_SANITIZE:-0}" != 1 ]; then
  echo "== sanitizers (tools/sanitize.sh)"
  bash tools/sanitize.sh
fi
if [ "${VB_SKIP_FUZZ:-0}" != 1 ]; then
  echo "== fuzzing (tools/fuzz.sh ${VB_FUZZ_SECONDS:-20})"
  bash tools/fuzz.sh "${VB_FUZZ_SECONDS:-20}"
fi
echo "== test suites (CTest); $(($(date +%s) - t0)) s so far"
cd "${BUILD_DIR:-build}"
ctest --output-on-failure --timeout 900 "$@"
