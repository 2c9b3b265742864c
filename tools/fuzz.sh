#!/usr/bin/env bash
# Fuzzes the readers of untrusted files (tests/fuzz: pickle, .pth, safetensors, annotations, JPEG) with
# libFuzzer under AddressSanitizer + UndefinedBehaviorSanitizer, each for SECONDS (default 60).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]      e.g. tools/fuzz.sh 600 pth safetensors
#
# Installs clang and libFuzzer's runtime when missing, configures its own build folder (build-fuzz: clang,
# CPU only, every object instrumented), seeds each target from tests/fuzz/seeds/<target> and the matching
# files of tests/fixtures/, and runs the targets one after the other (one core each). The corpus grown by a
# run is kept in build-fuzz/corpus/<target> for the next. Any crash, leak, sanitizer report, timeout or
# out-of-memory fails the script (exit 1) after all targets ran; the input is saved as
# build-fuzz/crashes/<target>/<kind>-<sha1> (reproduce: build-fuzz/tests/fuzz/fuzz_<target> <file>), and
# belongs in tests/fixtures/hostile/ with a regression test once fixed.
# Environment: FUZZ_BUILD_DIR (default build-fuzz), VB_JOBS (build parallelism, default all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(pickle pth safetensors annotations jpeg)
BUILD=${FUZZ_BUILD_DIR:-build-fuzz}
case "$SECONDS_PER_TARGET" in '' | *[!0-9]*) echo "fuzz: seconds must be a whole number, not '$SECONDS_PER_TARGET'" >&2; exit 2 ;; esac

# --- what the build needs: clang, its libFuzzer runtime (libclang-rt-<major>-dev on Debian), the usual libraries
source tools/apt-install.sh
install_missing fuzz clang cmake ninja-build pkg-config libturbojpeg0-dev nlohmann-json3-dev libcli11-dev
fuzzer_rt() { find "$(clang -print-resource-dir)/lib" -name 'libclang_rt.fuzzer-x86_64.a' -o -name 'libclang_rt.fuzzer.a' 2>/dev/null | head -1; }
if [ -z "$(fuzzer_rt)" ]; then
  major=$(clang -dumpversion | cut -d. -f1)
  install_pkgs fuzz "libclang-rt-${major}-dev"
  [ -n "$(fuzzer_rt)" ] || { echo "fuzz: libFuzzer's runtime (libclang_rt.fuzzer) is still missing after installing libclang-rt-${major}-dev" >&2; exit 1; }
fi

# --- build: every object with ASan + UBSan (any UB aborts) and fuzzer coverage; the targets link libFuzzer
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fsanitize=fuzzer-no-link -fno-omit-frame-pointer"
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_CXX_FLAGS="$SAN" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DVB_WITH_CUDA=OFF -DVB_BUILD_TESTS=OFF -DVB_FUZZ=ON
fi
cmake --build "$BUILD" -j "${VB_JOBS:-$(nproc)}" --target $(printf 'fuzz_%s ' "${TARGETS[@]}")

# --- seeds: the committed ones (tests/fuzz/make_seeds.py: tiny torch.save files, the fixtures' pickles, ...)
# and the fixture frame; the other fixtures are megabytes, which libFuzzer would only cut short.
seed_files() {
  case "$1" in
    jpeg) ls tests/fixtures/*.jpg ;;
  esac
}
max_len() {
  case "$1" in
    annotations) echo 16384 ;;
    *) echo 65536 ;;
  esac
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
for t in "${TARGETS[@]}"; do
  corpus="$BUILD/corpus/$t" crashes="$BUILD/crashes/$t" seeds="$BUILD/seeds/$t"
  mkdir -p "$corpus" "$crashes" "$seeds"
  [ -d "tests/fuzz/seeds/$t" ] && cp -f tests/fuzz/seeds/"$t"/* "$seeds"/ 2>/dev/null || true
  for f in $(seed_files "$t"); do cp -f "$f" "$seeds/"; done
  echo "fuzz: $t for ${SECONDS_PER_TARGET} s (corpus $corpus, seeds $seeds)"
  log="$BUILD/fuzz-$t.log"
  # rss_limit: a reader may use a few hundred MB on a hostile file, not more; timeout: no input may take 10 s.
  if "$BUILD/tests/fuzz/fuzz_$t" "$corpus" "$seeds" -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$t")" \
      -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$crashes/" >"$log" 2>&1; then
    echo "fuzz: $t ran clean: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') runs, corpus $(ls "$corpus" | wc -l) inputs"
  else
    echo "fuzz: $t FAILED (log $log; input saved in $crashes/):"
    grep -E 'ERROR: |runtime error|SUMMARY|Test unit written' "$log" | head -8 | sed 's/^/  /'
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: every target ran clean for ${SECONDS_PER_TARGET} s"
