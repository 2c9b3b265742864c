#!/usr/bin/env bash
# Installs what the build needs (Debian packages) when it is missing, then configures and builds vbtrain
# into build/ (Release). Safe to run again: it only installs and rebuilds what is out of date.
# Environment: BUILD_DIR (default build), VB_JOBS (default: all cores), VB_CMAKE_ARGS (extra cmake flags),
# VB_TARGETS (build only these targets; default all).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}

source tools/apt-install.sh
install_missing setup cmake ninja-build g++ pkg-config ccache libturbojpeg0-dev doctest-dev nlohmann-json3-dev libcli11-dev

# The CUDA toolkit is optional for the build: without nvcc the CPU path alone is built.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${VB_CMAKE_ARGS:-}
fi
cmake --build "$BUILD_DIR" -j "${VB_JOBS:-$(nproc)}" ${VB_TARGETS:+--target $VB_TARGETS}
