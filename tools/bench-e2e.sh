#!/usr/bin/env bash
# B1 end to end, as a user meets it: a synthetic Volleyball set of the real size (4,840 annotated frames of
# 1280x720, eight videos of 1920x1080: `vbtrain synth`'s defaults), then `vbtrain train` for 50 epochs from
# launch to report, with the wall time split by phase (the run's timing.json) and the process's own start-up
# and exit. Issue 11's goal on one H200 is 30 s launch to report; the notebook takes about 58 minutes.
#
#   tools/bench-e2e.sh [--build DIR] [--data DIR | --synth-dir DIR] [--epochs N] [--out DIR] [--scale F]
#                      [--clips-per-video N] [-- ARGS for vbtrain train]
#
# --data: an existing dataset; else the synthetic one, made once into --synth-dir (default data-e2e/, or
# data-e2e-<scale>-<clips>/ for other sizes) and kept; --scale / --clips-per-video: its size (for a quick check;
# the defaults are the real size). Everything after `--` goes to `vbtrain train` (e.g. --device cuda --precision
# tf32, or a smaller model). The run goes to --out (default runs/e2e, replaced each time). Prints a Markdown
# table; exit status: vbtrain's (1 if it wrote no timing.json), 2 for bad arguments or folders.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/build"
data=""
synth_dir=""
epochs=50
out="$root/runs/e2e"
scale=1
clips=88
train_args=()
value() { [[ $# -ge 2 ]] || { echo "bench-e2e: $1 needs a value (see --help)" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) value "$@"; build="$2"; shift 2 ;;
    --data) value "$@"; data="$2"; shift 2 ;;
    --synth-dir) value "$@"; synth_dir="$2"; shift 2 ;;
    --epochs) value "$@"; epochs="$2"; shift 2 ;;
    --out) value "$@"; out="${2%/}"; shift 2 ;;
    --scale) value "$@"; scale="$2"; shift 2 ;;
    --clips-per-video) value "$@"; clips="$2"; shift 2 ;;
    --) shift; train_args=("$@"); break ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-e2e: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
vbtrain="$build/tools/vbtrain"
[[ -x "$vbtrain" ]] || { echo "bench-e2e: $vbtrain not found (build first: tools/setup.sh)" >&2; exit 2; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

synth_note="given"
if [[ -z "$data" ]]; then
  if [[ -n "$synth_dir" ]]; then data="$synth_dir"
  elif [[ "$scale" == 1 && "$clips" == 88 ]]; then data="$root/data-e2e"
  else data="$root/data-e2e-$scale-$clips"; fi
  # .complete holds the size the set was made at; a folder without it is only ever replaced when empty or
  # left by an interrupted synth of this script (.partial), never a dataset of someone else's.
  want="scale $scale clips-per-video $clips"
  if [[ -f "$data/.complete" ]]; then
    [[ "$(cat "$data/.complete")" == "$want" ]] || {
      echo "bench-e2e: $data holds a set of another size ($(cat "$data/.complete")); remove it or give --synth-dir" >&2
      exit 2
    }
    synth_note="kept from an earlier run"
  else
    if [[ -e "$data" && ! -f "$data/.partial" && -n "$(ls -A "$data" 2>/dev/null)" ]]; then
      echo "bench-e2e: $data is not empty and not a set this script made; give another --synth-dir" >&2
      exit 2
    fi
    echo "bench-e2e: writing the synthetic dataset into $data (once) ..." >&2
    t0=$(now)
    rm -rf "$data"
    mkdir -p "$data"
    touch "$data/.partial"
    "$vbtrain" synth --out "$data" --overwrite --scale "$scale" --clips-per-video "$clips" >&2
    echo "$want" >"$data/.complete"
    rm -f "$data/.partial"
    synth_note="written in $(secs "$t0" "$(now)") s, not part of the run"
  fi
fi
frames=$(find "$data" -name '*.jpg' | wc -l)

echo "bench-e2e: vbtrain train --data $data --epochs $epochs --out $out --overwrite ${train_args[*]}" >&2
log="$out.log"
mkdir -p "$(dirname "$out")"
t0=$(now)
set +e
"$vbtrain" train --data "$data" --epochs "$epochs" --out "$out" --overwrite "${train_args[@]}" >"$log" 2>&1
rc=$?
set -e
t1=$(now)
wall=$(secs "$t0" "$t1")
tail -n 3 "$log" >&2
if [[ $rc -ne 0 || ! -f "$out/timing.json" ]]; then
  echo "bench-e2e: vbtrain train failed (exit $rc); its output is in $log" >&2
  exit $(( rc == 0 ? 1 : rc ))
fi
field() { sed -n "s/.*\"$1\": *\([0-9.eE+-]*\).*/\1/p" "$out/timing.json" | head -1; }
f1() { awk -v a="$1" 'BEGIN { printf "%.1f", a }'; }
backend=$(sed -n 's/.*"backend": *"\([^"]*\)".*/\1/p' "$out/config.json" | head -1)
model=$(sed -n 's/.*"model": *"\([^"]*\)".*/\1/p' "$out/config.json" | head -1)
accuracy=""
[[ -f "$out/test_metrics.json" ]] && accuracy=$(sed -n 's/.*"accuracy": *\([0-9.eE+-]*\).*/\1/p' "$out/test_metrics.json" | head -1)
[[ -n "$accuracy" ]] && accuracy=$(awk -v a="$accuracy" 'BEGIN { printf "%.4f", a }')

echo "# B1 end to end, $(date -u +%Y-%m-%d) ($(nproc) cores)"
echo
echo "$frames frames in $data ($synth_note); $model on $backend; $epochs epochs; test accuracy ${accuracy:-n/a}."
echo
echo "| phase | seconds |"
echo "| --- | --- |"
echo "| **launch to report** (goal on one H200: 30; the notebook: about 3,500) | **$wall** |"
echo "| setup: index, backend, model, run folder, loaders | $(f1 "$(field setup_s)") |"
echo "| training | $(f1 "$(field training_s)") |"
echo "| of which waiting for the loader ($(field jpeg_decodes) JPEG decodes) | $(f1 "$(field training_data_wait_s)") |"
echo "| validation | $(f1 "$(field validation_s)") |"
echo "| checkpoints and reports | $(f1 "$(field checkpoints_s)") |"
echo "| test split | $(f1 "$(field test_s)") |"
echo "| final model | $(f1 "$(field final_files_s)") |"
echo "| process start-up and exit (launch to report minus the run's own total, $(f1 "$(field total_s)") s) | $(awk -v w="$wall" -v t="$(field total_s)" 'BEGIN { printf "%.1f", w - t }') |"
