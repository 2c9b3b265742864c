#!/usr/bin/env bash
# tools/gpu-check.sh end to end without a GPU (VB_GPU_CHECK_FAKE=1: every GPU step is a stub), three runs
# at once: (a) a stub that sleeps past a short deadline: the deadline holds, every step that ended has its
# row on stdout and in the table, the later steps are recorded as not run, $OUT holds at most 4 files, the
# archive holds the logs, the JSON parses; (b) a binary whose library is missing: ldd stops the check at
# once; (c) a kill from outside mid-step: the check stops at once and keeps what it did.
# usage: test_gpu_check.sh SOURCE_DIR BUILD_DIR
set -uo pipefail
SRC=$1
BUILD=$2
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
errors=0
check() {  # check DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; errors=$((errors + 1)); fi
}
now_ms() { date +%s%3N; }
# The sanitizer steps must exist whether or not this checkout has .gpu-tools/ (the stub runs instead).
export VB_GPU_CHECK_SANITIZER=/nonexistent/compute-sanitizer

# A small build folder: the real binaries, linked (ldd runs on them for real; the stubs run instead of them).
mkdir -p "$T/build/tools" "$T/build/tests"
for b in tools/vbtrain tools/vbbench tests/test_cuda_ops tests/test_gemm; do
  [[ -x "$BUILD/$b" ]] && ln -s "$BUILD/$b" "$T/build/$b"
done
[[ -e "$T/build/tools/vbtrain" && -e "$T/build/tests/test_cuda_ops" ]] || { echo "no vbtrain or test_cuda_ops in $BUILD"; exit 1; }

# (a) the deadline. 10 s: 3 s are kept in reserve and a step needs 1.5 s to start, which leaves 5.5 s for the
# script's start and the ldd step; with 7 s, a clean-clone CI run (cold page cache for the CUDA libraries that
# ldd maps, three instances of the script at once) sometimes had less and skipped the slow step instead of
# stopping it.
DEADLINE=10
start_a=$(now_ms)
OUT=$T/out-a VB_GPU_CHECK_FAKE=1 VB_GPU_CHECK_FAKE_SLOW=versions \
  bash "$SRC/tools/gpu-check.sh" --deadline $DEADLINE "$T/build" >"$T/a.out" 2>"$T/a.err" &
pid_a=$!

# (b) a library not found
if command -v cc >/dev/null; then
  mkdir -p "$T/bad/tools" "$T/bad/tests" "$T/lib"
  echo 'int vb_missing(void) { return 0; }' >"$T/lib/m.c"
  echo 'int vb_missing(void); int main(void) { return vb_missing(); }' >"$T/main.c"
  cc -shared -fPIC -o "$T/lib/libvbmissing.so" "$T/lib/m.c" && cc -o "$T/bad/tools/vbtrain" "$T/main.c" -L"$T/lib" -lvbmissing &&
    rm "$T/lib/libvbmissing.so"
  OUT=$T/out-b VB_GPU_CHECK_FAKE=1 bash "$SRC/tools/gpu-check.sh" --deadline 30 "$T/bad" >"$T/b.out" 2>"$T/b.err" &
  pid_b=$!
fi

# (c) killed from outside while a step runs (the CUDA op tests, after the sanitizer steps)
OUT=$T/out-c VB_GPU_CHECK_FAKE=1 VB_GPU_CHECK_FAKE_SLOW=test_cuda_ops \
  bash "$SRC/tools/gpu-check.sh" --deadline 60 "$T/build" >"$T/c.out" 2>"$T/c.err" &
pid_c=$!
for _ in $(seq 50); do grep -q "racecheck" "$T/c.out" 2>/dev/null && break; sleep 0.1; done
sleep 0.5
kill -TERM $pid_c
kill_ms=$(now_ms)
wait $pid_c
rc_c=$?
stop_c=$(($(now_ms) - kill_ms))

wait $pid_a
rc_a=$?
elapsed_a=$(($(now_ms) - start_a))

echo "--- (a) stdout"; cat "$T/a.out"; echo "--- (a) stderr"; cat "$T/a.err"
check "(a) exits 1 (a step timed out)" test $rc_a -eq 1
check "(a) ends within the deadline, 2 s margin ($elapsed_a ms for $DEADLINE s)" test $elapsed_a -le $(((DEADLINE + 2) * 1000))
files=$(ls -A "$T/out-a" | wc -l)
check "(a) at most 4 files in OUT ($files)" test "$files" -le 4
MD=$(ls "$T"/out-a/gpu-results-*.md)
TAR=$(ls "$T"/out-a/gpu-logs-*.tar.gz)
JS=$(ls "$T"/out-a/gpu-figures-*.json)
check "(a) the three files are there" test -s "$MD" -a -s "$TAR" -a -s "$JS"
# The step rows on stdout: between the header and the closing line (which repeats the targets' table).
sed -n '/^| --- | --- | --- | --- |$/,/^gpu-check: done/p' "$T/a.out" | grep '^| ' | grep -v '^| --- ' >"$T/a.rows"
sed -n '/^## Steps/,/^## /p' "$MD" | grep '^| ' | grep -v '^| step \|^| --- ' >"$T/a.mdrows"
check "(a) one stdout row per step, as in the table ($(wc -l <"$T/a.rows") vs $(wc -l <"$T/a.mdrows"))" \
  test "$(cut -d'|' -f2-3 "$T/a.rows")" = "$(cut -d'|' -f2-3 "$T/a.mdrows")"
check "(a) each step once" test "$(cut -d'|' -f2 "$T/a.rows" | sort | uniq -d)" = ""
check "(a) ldd ran and passed" grep -q '^| ldd | passed' "$T/a.rows"
check "(a) the step before the slow one completed" grep -q '^| ldd | passed' "$T/a.rows"
check "(a) the slow step was stopped at its limit" grep -q '^| versions | TIMED OUT' "$T/a.rows"
check "(a) the steps after it are recorded as not run" grep -q '^| default-run | not run (deadline)' "$T/a.rows"
check "(a) nothing ran after the slow step" \
  test "$(sed -n '/^| versions /,$p' "$T/a.rows" | tail -n +2 | grep -vc 'not run (deadline)\|MISSING')" = 0
tar -tzf "$TAR" >"$T/a.tar"
check "(a) the archive holds the logs" grep -q 'logs/ldd.log' "$T/a.tar"
check "(a) the archive holds the slow step's log" grep -q 'logs/versions.log' "$T/a.tar"
check "(a) the stub's log says what it would run" \
  bash -c "tar -xzOf '$TAR' logs/versions.log | grep -q 'fake versions: .*vbbench --versions'"
if command -v python3 >/dev/null; then
  check "(a) the JSON parses and holds every row" python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert len(d["rows"]) == int(sys.argv[2]), (len(d["rows"]), sys.argv[2])
assert d["meta"]["fake"] is True and d["meta"]["finished"] is True
assert d["figures"]["versions"]["fake"] is True' "$JS" "$(wc -l <"$T/a.rows")"
  check "(a) the table says it is a fake run" grep -q 'FAKE RUN' "$MD"
fi

if [[ -n "${pid_b:-}" ]]; then
  wait $pid_b
  rc_b=$?
  echo "--- (b) stdout"; cat "$T/b.out"
  check "(b) exits 1" test $rc_b -eq 1
  check "(b) the ldd row names the missing library" grep -q '^| ldd | FAILED.*libvbmissing' "$T/b.out"
  check "(b) and nothing else ran" test "$(grep -c '^| [a-z]' "$T/b.out")" = 2  # the header and the ldd row
  check "(b) the table is written" grep -q 'libvbmissing' "$T"/out-b/gpu-results-*.md
else
  echo "skipped (b): no C compiler"
fi

echo "--- (c) stdout"; cat "$T/c.out"
check "(c) exits 1" test $rc_c -eq 1
check "(c) stops within 5 s of the signal, not at the step's 60 s limit ($stop_c ms)" test $stop_c -le 5000
check "(c) says it was stopped" grep -q 'stopped by a signal' "$T/c.out"
check "(c) the table keeps the rows done before" grep -q '^| racecheck | ' "$T"/out-c/gpu-results-*.md
check "(c) and the stop" grep -q 'stopped by a signal' "$T"/out-c/gpu-results-*.md
check "(c) at most 4 files in OUT" test "$(ls -A "$T/out-c" | wc -l)" -le 4

[[ $errors -eq 0 ]] && echo "all checks passed" || echo "$errors checks FAILED"
exit $((errors > 0))
