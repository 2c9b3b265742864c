#!/usr/bin/env bash
# The CPU test suites under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/), and the threaded
# suites under ThreadSanitizer (build-tsan/). Any sanitizer report fails the run: the reporting process exits
# non-zero, and ASan/LSan/TSan reports also go to files checked at the end, which catches one from a vbtrain
# child process whose test expected it to fail anyway. UBSan reports abort the process but go to stderr only:
# GCC 12's UBSan ignores log_path next to ASan, so one in a child that was expected to fail is not caught.
# Installs what it needs when missing; builds with ccache when it is installed (tools/setup.sh).
# Usage: tools/sanitize.sh [asan|tsan]...   (default: both)
# Environment: VB_JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
JOBS=${VB_JOBS:-$(nproc)}
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(asan tsan)

# GCC's sanitizer runtimes come in their own packages (libasan8 etc., pulled in by g++ but checked here
# since a minimal install may lack them).
source tools/apt-install.sh
need=()
gcc_major=$(g++ -dumpversion 2>/dev/null | cut -d. -f1 || true)
for lib in asan ubsan tsan; do
  if [ -z "$gcc_major" ] || [ ! -e "$(g++ -print-file-name=lib$lib.so)" ]; then
    case $lib in asan) need+=("libasan8") ;; ubsan) need+=("libubsan1") ;; tsan) need+=("libtsan2") ;; esac
  fi
done
have_pkg util-linux || need+=(util-linux)   # setarch, for TSan below
install_pkgs sanitize ${need[@]+"${need[@]}"}

# Reports land in files under this folder (as well as failing the process); any file there fails the run.
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/vb-sanitize.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT
# Suppressions, only for false positives in third-party code, each explained in its file.
supp() { [ -f "$ROOT/tests/sanitizer-$1.supp" ] && echo ":suppressions=$ROOT/tests/sanitizer-$1.supp" || true; }

# Both sanitizer builds are Debug (assertions on) with -O1 -g from VB_SANITIZE, the CPU path only; tools/setup.sh
# installs the build's packages and configures the folder the first time.
build() {  # build DIR SANITIZERS [targets...]
  local dir=$1 san=$2
  shift 2
  VB_JOBS=$JOBS BUILD_DIR=$dir VB_TARGETS="$*" \
    VB_CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Debug -DVB_WITH_CUDA=OFF -DVB_SANITIZE=$san" bash tools/setup.sh
}

check_logs() {  # check_logs NAME: fail when any sanitizer wrote a report
  local found
  found=$(find "$LOGS" -type f -size +0 | sort)
  if [ -n "$found" ]; then
    echo "sanitize: $1: sanitizer reports:" >&2
    for f in $found; do echo "--- $f" >&2; cat "$f" >&2; done
    return 1
  fi
}

status=0
for mode in "${modes[@]}"; do
  case $mode in
  asan)
    build build-asan address,undefined
    # detect_leaks: every suite and vbtrain run must free what it allocates. detect_stack_use_after_return
    # catches dangling references to locals (the views and spans of the engine).
    export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:log_path=$LOGS/asan$(supp asan)"
    export LSAN_OPTIONS="print_suppressions=0$(supp lsan)"
    export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1$(supp ubsan)"
    # Every CPU suite (test_cuda_ops skips without CUDA); the tests find build-asan's own vbtrain (VB_BINARY_DIR).
    (cd build-asan && ctest --output-on-failure --timeout 900 -j "$JOBS") || status=1
    check_logs asan || status=1
    unset ASAN_OPTIONS LSAN_OPTIONS UBSAN_OPTIONS
    ;;
  tsan)
    # The suites that run threads: the loader's worker pool, the CPU kernels' parallel_for (gemm, the NHWC
    # convolution, batch norm and pooling, each run at 1 and 2 threads) and the JPEG decoder's per-thread
    # handles. (test_model and test_data_index thread the same pool; left out to keep CI short: `VB_TSAN_ALL=1`
    # adds them.)
    tsan_suites=(test_data_loader test_gemm test_conv_nhwc test_nhwc_fused test_data_jpeg_errors)
    [ "${VB_TSAN_ALL:-0}" = 1 ] && tsan_suites+=(test_model test_data_index)
    build build-tsan thread "${tsan_suites[@]}"
    export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:log_path=$LOGS/tsan$(supp tsan)"
    regex="^($(IFS='|'; echo "${tsan_suites[*]}"))\$"
    # GCC 12's TSan fails with "unexpected memory mapping" on kernels with more than 28 bits of mmap
    # randomisation (vm.mmap_rnd_bits; this machine has 28, so it is a precaution): setarch -R turns address
    # randomisation off for the tests, which changes nothing else.
    (cd build-tsan && setarch "$(uname -m)" -R ctest --output-on-failure --timeout 900 -j "$JOBS" -R "$regex") || status=1
    check_logs tsan || status=1
    unset TSAN_OPTIONS
    ;;
  *) echo "vbtrain: error: sanitize.sh: unknown mode '$mode' (asan or tsan)" >&2; exit 2 ;;
  esac
done
[ $status -eq 0 ] && echo "sanitize: ${modes[*]}: clean"
exit $status
