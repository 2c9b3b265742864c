#!/usr/bin/env bash
# The main job: installs what is missing, builds, then trains. With no arguments, the default run: a
# synthetic Volleyball dataset (generated once into data-synth/) and a preset that suits the machine, then
# the test split and runs/default/report.html. Arguments go to `vbtrain train` (e.g. --data DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${BUILD_DIR:-build}/tools/vbtrain" train "$@"
