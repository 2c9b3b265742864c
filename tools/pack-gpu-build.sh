#!/usr/bin/env bash
# Packs what tools/gpu-check.sh needs from a build folder into one small archive that can be carried to the
# GPU machine: .gpu-tools/build.tar.xz with the executables (stripped: vbtrain, vbbench, vbconvert, every test
# binary) and CMakeCache.txt (it names the checkout the tests take their fixtures from). An unpacked build
# folder with its objects is over 50 MiB and the device tool carries 64 MiB in all, working tree included;
# the archive is about a fifth of that.
#
# usage: tools/pack-gpu-build.sh [build-folder]      (default: build)
# then carry .gpu-tools and run: OUT=$OUT tools/gpu-check.sh --deadline 480 .gpu-tools/build.tar.xz
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${1:-$ROOT/build}
[[ -x "$SRC/tools/vbtrain" ]] || { echo "pack-gpu-build: no $SRC/tools/vbtrain: build first (tools/setup.sh)" >&2; exit 1; }
grep -q "VB_WITH_CUDA:BOOL=ON" "$SRC/CMakeCache.txt" 2>/dev/null ||
  echo "pack-gpu-build: warning: $SRC was not configured with VB_WITH_CUDA=ON" >&2
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/build/tools" "$STAGE/build/tests" "$ROOT/.gpu-tools"
cp "$SRC/CMakeCache.txt" "$STAGE/build/"
for f in "$SRC"/tools/vbtrain "$SRC"/tools/vbbench "$SRC"/tools/vbconvert "$SRC"/tests/test_*; do
  [[ -f "$f" && -x "$f" ]] || continue
  dest=$STAGE/build/${f#"$SRC"/}
  strip -o "$dest" "$f" 2>/dev/null || cp "$f" "$dest"
done
tar -C "$STAGE" -cJf "$ROOT/.gpu-tools/build.tar.xz" build
echo "pack-gpu-build: $(du -h "$ROOT/.gpu-tools/build.tar.xz" | cut -f1) in .gpu-tools/build.tar.xz ($(find "$STAGE/build" -type f -perm -u+x | wc -l) binaries)"
