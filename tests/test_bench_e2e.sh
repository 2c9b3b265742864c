#!/usr/bin/env bash
# tools/bench-e2e.sh on a tiny synthetic set (the CPU, a [1,1,1,1] width-8 model): it writes the set once and
# keeps it, runs vbtrain train, and prints the launch-to-report time and every phase of timing.json (each row
# checked against the JSON); a dataset without a test split; a failing run reported with its exit status and
# log; a folder that is not its set left alone; bad arguments refused.
# usage: test_bench_e2e.sh SOURCE_DIR BUILD_DIR
set -uo pipefail
SRC=$1 BUILD=$2
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0
check() {  # DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; fails=$((fails + 1)); fi
}
E2E=$SRC/tools/bench-e2e.sh
tiny=(--device cpu --threads 2 --blocks 1,1,1,1 --width 8 --image-size 32 --batch-size 16)
args=(--build "$BUILD" --synth-dir "$T/synth" --scale 0.125 --clips-per-video 2 --epochs 2 --out "$T/run" -- "${tiny[@]}")

bash "$E2E" "${args[@]}" >"$T/a.md" 2>"$T/a.err"
check "first run exits 0" test $? -eq 0
check "the set was written once" grep -q "written in" "$T/a.md"
check "the synthetic set is complete, with its size" grep -qx "scale 0.125 clips-per-video 2" "$T/synth/.complete"
# Each phase's row shows timing.json's value (one decimal) and the table has all of them.
check "timing.json's phases in the table" python3 - "$T/run/timing.json" "$T/a.md" <<'PY'
import json, re, sys
t = json.load(open(sys.argv[1]))
md = open(sys.argv[2]).read()
rows = {"setup": "setup_s", "training |": "training_s", "waiting for the loader": "training_data_wait_s",
        "validation": "validation_s", "checkpoints and reports": "checkpoints_s", "test split": "test_s",
        "final model": "final_files_s"}
for label, key in rows.items():
    m = re.search(r"^\| [^|\n]*" + re.escape(label.rstrip(" |")) + r"[^|\n]*\| (\S+) \|$", md, re.M)
    assert m, label
    assert m.group(1) == "%.1f" % t[key], (label, m.group(1), t[key])
assert t["epochs"] == 2 and t["jpeg_decodes"] > 0, t
launch = float(re.search(r"launch to report.*\| \*\*(\S+)\*\* \|", md).group(1))
assert launch + 0.05 >= t["total_s"], (launch, t["total_s"])
assert re.search(r"test accuracy [0-9]\.[0-9]{4}\.", md), "accuracy"
PY
bash "$E2E" "${args[@]}" >"$T/b.md" 2>"$T/b.err"
check "second run exits 0" test $? -eq 0
check "and keeps the set" grep -q "kept from an earlier run" "$T/b.md"
bash "$E2E" "${args[@]/0.125/0.25}" >"$T/s.md" 2>"$T/s.err"
check "a kept set of another size is refused (exit $?)" grep -q "holds a set of another size" "$T/s.err"

# No test split: the table is printed, the accuracy is n/a.
cp -r "$T/synth" "$T/notest"
for v in 4 5 9 11 14 20 21 25 29 34 35 37 43 44 45 47; do rm -rf "$T/notest/videos/$v"; done
bash "$E2E" --build "$BUILD" --data "$T/notest" --epochs 1 --out "$T/notest-run" -- "${tiny[@]}" >"$T/n.md" 2>"$T/n.err"
check "without a test split: exit 0" test $? -eq 0
check "without a test split: the table, accuracy n/a" grep -q "test accuracy n/a" "$T/n.md"

# A run that fails inside training (a dataset with no frames at all), and bad arguments.
mkdir -p "$T/empty/videos"
bash "$E2E" --build "$BUILD" --data "$T/empty" --epochs 1 --out "$T/bad" -- "${tiny[@]}" >"$T/c.md" 2>"$T/c.err"
rc=$?
check "a failing train is reported (exit $rc)" test $rc -ne 0
check "with its log named" grep -q "its output is in $T/bad.log" "$T/c.err"
mkdir -p "$T/theirs" && echo keep >"$T/theirs/file"
bash "$E2E" --build "$BUILD" --synth-dir "$T/theirs" --scale 0.125 --clips-per-video 2 >/dev/null 2>"$T/t.err"
check "a folder that is not its set is refused" grep -q "not a set this script made" "$T/t.err"
check "and left alone" test -f "$T/theirs/file"
bash "$E2E" --bogus >/dev/null 2>"$T/u.err"
check "an unknown argument is refused" grep -q "unknown argument --bogus" "$T/u.err"
bash "$E2E" --epochs >/dev/null 2>"$T/v.err"
check "an option without its value is refused" grep -q "needs a value" "$T/v.err"
if ((fails)); then
  for f in a.md a.err c.err n.md n.err; do echo "--- $f"; tail -8 "$T/$f"; done
  exit 1
fi
