#!/usr/bin/env bash
# tools/bench-e2e.sh on a tiny synthetic set (the CPU, a [1,1,1,1] width-8 model): it writes the set once and
# keeps it, runs vbtrain train, and prints the launch-to-report time and every phase of timing.json; a failing
# run is reported with its exit status. usage: test_bench_e2e.sh SOURCE_DIR BUILD_DIR
set -uo pipefail
SRC=$1 BUILD=$2
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0
check() {  # DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; fails=$((fails + 1)); fi
}
args=(--build "$BUILD" --synth-dir "$T/synth" --scale 0.125 --clips-per-video 2 --epochs 2 --out "$T/run"
      -- --device cpu --threads 2 --blocks 1,1,1,1 --width 8 --image-size 32 --batch-size 16)
bash "$SRC/tools/bench-e2e.sh" "${args[@]}" >"$T/a.md" 2>"$T/a.err"
check "first run exits 0" test $? -eq 0
check "the set was written once" grep -q "written in" "$T/a.md"
check "the synthetic set is complete" test -f "$T/synth/.complete"
for row in "launch to report" "setup" "training" "waiting for the loader" "validation" "checkpoints and reports" \
           "test split" "final model" "process start-up"; do
  check "row: $row" grep -q "^| .*$row.* | \**[0-9][0-9.]*\** |$" "$T/a.md"
done
check "the run's timing.json" test -f "$T/run/timing.json"
bash "$SRC/tools/bench-e2e.sh" "${args[@]}" >"$T/b.md" 2>"$T/b.err"
check "second run exits 0 and keeps the set" grep -q "kept from an earlier run" "$T/b.md"
# A failing run: its exit status, and where its output is.
bash "$SRC/tools/bench-e2e.sh" --build "$BUILD" --synth-dir "$T/synth" --scale 0.125 --clips-per-video 2 --epochs 1 \
  --out "$T/bad" -- --device cpu --blocks 1,1,1,1 --width 8 --image-size 32 --batch-size 16 --lr -1 >"$T/c.md" 2>"$T/c.err"
rc=$?
check "a failing train is reported (exit $rc)" test $rc -ne 0
check "with its log named" grep -q "its output is in $T/bad.log" "$T/c.err"
check "an unknown argument is refused" bash -c "! bash '$SRC/tools/bench-e2e.sh' --bogus 2>/dev/null"
if ((fails)); then
  echo "--- a.md"; cat "$T/a.md"; echo "--- a.err"; tail -5 "$T/a.err"
  exit 1
fi
