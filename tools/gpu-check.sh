#!/usr/bin/env bash
# The one check for the GPU machine (an NVIDIA H200 with PyTorch beside it), made to fit one call of the
# device tool: one command of at most 10 minutes, of which only a few files come back.
#
# usage: tools/gpu-check.sh [--deadline SECONDS] [build-folder]
#   --deadline   the whole check ends within this many seconds (default 480), whatever each step does
#   build-folder default: $VB_BUILD, else build-gpu, else build-cuda, else build; or the archive that
#                tools/pack-gpu-build.sh makes (.gpu-tools/build.tar.xz), unpacked into build-carried/. A folder that already
#                holds the binaries is used as it is (a build carried from another checkout names paths
#                that do not exist here: its tests find their fixtures through a link made at that path);
#                one without them is configured and built first (VB_REBUILD=1 rebuilds a present one).
# Environment: OUT (where the files go; default <build>/gpu-check-<date>), TORCH_VENV (default
#   /opt/torch/.venv: its python runs the PyTorch side, its cuDNN goes first on LD_LIBRARY_PATH),
#   VB_GPU_CHECK_FAKE=1 (every GPU step runs a stub instead: how tests/test_gpu_check.sh checks the script
#   here; VB_GPU_CHECK_FAKE_SLOW / _FAIL: a glob of step names whose stub sleeps / fails),
#   VB_GPU_CHECK_SANITIZER (a compute-sanitizer to use instead of the one looked for).
#
# What it does, most important first (each step bounded by its own cap and by what is left of the deadline;
# a step that cannot start in time is recorded as not run):
#   1. ldd on every binary: a library "not found" is reported and the check stops there;
#   2. what runs: cuDNN, cuBLAS, CUDA runtime and driver as loaded (`vbbench --versions`), nvidia-smi;
#   3. compute-sanitizer memcheck over the CUDA op tests (test cases named "(large)" left out), racecheck
#      over the reduction kernels (batch norm, softmax + weighted CE, pooling), memcheck over the NHWC kernel
#      tests (test_cuda_nhwc); compute-sanitizer comes from
#      .gpu-tools/ (tools/fetch-gpu-tools.sh, carried with the build), else PATH;
#   4. every test binary: the CUDA op tests, the NHWC kernel tests, the CUDA op tests again with the backend in
#      NHWC (test_cuda_ops_nhwc), then the others;
#   5. parity: PyTorch's own distances to the golden run (tools/torch_distances.py, fp32, tf32 and bf16, made
#      here) and `vbtrain verify --device cuda --against` them, then bf16 against the committed PyTorch autocast
#      run (verify-bf16-autocast);
#   6. `vbtrain bench` (tf32, tf32 with the backend in NHWC, tf32 with the step captured as a CUDA graph, bf16,
#      fp32), vbbench (tf32 and bf16), tools/torch_bench.py, then the README's default run (what
#      tools/run.sh runs after its setup step: `vbtrain train` with no --data) if time remains.
# Each step's row is printed the moment the step ends, and the files in $OUT are rewritten after every step,
# so a run killed from outside still leaves what it did. $OUT gets three files: gpu-results-<date>.md (the
# table, with the targets), gpu-logs-<date>.tar.gz (every log), gpu-figures-<date>.json (every figure).
# Exit status: 0 when every step passed, 1 otherwise, 2 on bad arguments.
set -uo pipefail

DEADLINE=480
BUILD=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --deadline) DEADLINE=${2:-}; shift 2 || shift ;;
    --deadline=*) DEADLINE=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) BUILD=$1; shift ;;
  esac
done
[[ "$DEADLINE" =~ ^[0-9]+$ && "$DEADLINE" -gt 0 ]] || { echo "gpu-check: --deadline takes a number of seconds" >&2; exit 2; }

# Milliseconds since the epoch, without starting a process where the shell can tell (bash 5).
if [[ -n "${EPOCHREALTIME:-}" ]]; then
  now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((10#$t / 1000)); }
else
  now_ms() { date +%s%3N; }
fi
T0_MS=$(now_ms)
END_MS=$((T0_MS + DEADLINE * 1000))
# Kept back for the rows of the steps left out and the last rewrite of the files: 10%, within 3 to 8 s.
RESERVE_MS=$((DEADLINE * 100 < 3000 ? 3000 : DEADLINE * 100 > 8000 ? 8000 : DEADLINE * 100))
MIN_STEP_MS=1500
FAKE=${VB_GPU_CHECK_FAKE:-0}
# Every step runs the backend's defaults unless it names a switch (the NHWC and graph steps do): a VB_CUDA_LAYOUT in
# the caller's environment would silently make the default rows test another layout (VB_CUDA_GRAPH: another step).
unset VB_CUDA_LAYOUT VB_CUDA_GRAPH

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "$BUILD" ]]; then
  BUILD=${VB_BUILD:-}
  for b in build-gpu build-cuda build; do
    [[ -z "$BUILD" && -x "$ROOT/$b/tools/vbtrain" ]] && BUILD=$ROOT/$b
  done
  [[ -n "$BUILD" ]] || BUILD=$ROOT/build-gpu
fi
[[ "$BUILD" = /* ]] || BUILD=$PWD/$BUILD
# An archive of tools/pack-gpu-build.sh (what fits the device tool's carry): unpacked beside the checkout.
if [[ -f "$BUILD" && "$BUILD" == *.tar.xz ]]; then
  # tar with xz where it can; Python's tarfile (standard library) where tar lacks xz.
  unpack_py() {
    rm -rf "$ROOT/build-carried" "$ROOT/build-carried.tmp" &&
      python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BUILD" "$ROOT/build-carried.tmp" &&
      mv "$ROOT/build-carried.tmp/build" "$ROOT/build-carried" && rm -rf "$ROOT/build-carried.tmp"
  }
  rm -rf "$ROOT/build-carried" && mkdir -p "$ROOT/build-carried" &&
    if tar -C "$ROOT/build-carried" --strip-components=1 -xJf "$BUILD" 2>/dev/null; then :; else unpack_py; fi ||
    { echo "gpu-check: cannot unpack $BUILD" >&2; exit 2; }
  BUILD=$ROOT/build-carried
fi
DATE=$(date -u +%Y-%m-%d)
OUT=${OUT:-$BUILD/gpu-check-$DATE}
mkdir -p "$OUT" || { echo "gpu-check: cannot create $OUT" >&2; exit 2; }
RESULT_MD=$OUT/gpu-results-$DATE.md
LOGTAR=$OUT/gpu-logs-$DATE.tar.gz
FIGJSON=$OUT/gpu-figures-$DATE.json
WORK=$(mktemp -d)
LOGS=$WORK/logs
FIG=$WORK/figures
mkdir -p "$LOGS" "$FIG"
CHILD=""
cleanup() { [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null; [[ -n "${VB_GPU_CHECK_KEEP:-}" ]] || rm -rf "$WORK"; }
trap cleanup EXIT

# PyTorch's environment carries cuDNN 9.19; the system has 9.14. The newer one first (gpu-target.md).
TORCH_VENV=${TORCH_VENV:-/opt/torch/.venv}
CUDNN_DIR=$(ls -d "$TORCH_VENV"/lib/python3*/site-packages/nvidia/cudnn/lib 2>/dev/null | head -1)
[[ -n "$CUDNN_DIR" ]] && export LD_LIBRARY_PATH="$CUDNN_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
PY=$TORCH_VENV/bin/python
[[ -x "$PY" ]] || PY=python3
RPY=$(command -v python3 || echo "$PY")  # renders the files; needs nothing beyond the standard library
VBTRAIN=$BUILD/tools/vbtrain
VBBENCH=$BUILD/tools/vbbench
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]] && COMMIT="$COMMIT (with local changes)"
STATUS=0

# ---- the stub that stands in for every GPU command in fake mode ----
cat >"$WORK/fake-step.sh" <<'EOF'
#!/usr/bin/env bash
# Stub of a GPU step: says what it would run, writes a small JSON wherever the command would write one.
name=$1; shift
echo "fake $name: $*"
prev=""
for a in "$@"; do
  case $prev in --json|--out) printf '{"fake": true, "step": "%s"}\n' "$name" >"$a" ;; esac
  prev=$a
done
case $name in ${VB_GPU_CHECK_FAKE_FAIL:-/}) echo "fake $name: failing as asked"; exit 3 ;; esac
case $name in ${VB_GPU_CHECK_FAKE_SLOW:-/}) exec sleep "${VB_GPU_CHECK_FAKE_SLEEP:-3600}" ;; esac
exit 0
EOF
chmod +x "$WORK/fake-step.sh"

# ---- rows, and the files in $OUT rewritten after each one ----
# One line of plain text for a table cell, in the shell alone (rows are written after the deadline too, when
# the machine may be too busy to start many processes quickly).
clean_text() {
  local s=$1 LC_ALL=C
  s=${s//[$'\t\n\r']/ }
  s=${s//|//}
  s=${s//[$'\001'-$'\010'$'\013'-$'\037']/}
  printf '%s' "${s:0:240}"
}
json_str() {
  local s
  s=$(clean_text "$1")
  s=${s//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}
secs() { local v=$1 sign=""; ((v < 0)) && sign="-" && v=$((-v)); printf '%s%d.%03d' "$sign" $((v / 1000)) $((v % 1000)); }
left_ms() { echo $((END_MS - RESERVE_MS - $(now_ms))); }

# row NAME RESULT NOTE: prints the row now, records it, rewrites the files in $OUT.
row() {
  local name=$1 result=$2 note=$3 line
  line="| $name | $result | $(secs "${DUR_MS:-0}") s | $(clean_text "$note") |"
  echo "$line"
  echo "$line" >>"$WORK/rows.md"
  printf '{"step": %s, "result": %s, "seconds": %s, "note": %s, "passed": %s}\n' "$(json_str "$name")" \
    "$(json_str "$result")" "$(secs "${DUR_MS:-0}")" "$(json_str "$note")" \
    "$([[ $result == passed* ]] && echo true || echo false)" >>"$WORK/rows.jsonl"
  [[ $result == passed* ]] || STATUS=1
  # Rewriting the files costs about a second on a busy machine: done after any step that took a while, and
  # at least every few seconds, so a kill from outside loses at most the last few fast rows (printed anyway).
  if ((${DUR_MS:-0} >= 2000 || $(now_ms) - LAST_PUBLISH_MS >= 5000)); then publish; fi
  DUR_MS=0
}

# Prints the last lines of a failing step's log, briefly (the device tool returns only the output's tail).
tail_log() { tail -n "${2:-3}" "$1" 2>/dev/null | cut -c1-200 | sed 's/^/    /'; }

# run_step NAME CAP_SECONDS CMD...: runs CMD (in $STEP_DIR, default the checkout) with its output in
# logs/NAME.log, bounded by CAP and by the deadline. Sets RC (125: not started, no time left; 124 or 137:
# stopped at its limit), DUR_MS and LIMIT_MS. In fake mode the stub runs instead of CMD.
run_step() {
  local name=$1 cap_ms=$(($2 * 1000)); shift 2
  local log=$LOGS/$name.log left
  left=$(left_ms)
  LIMIT_MS=$((cap_ms < left ? cap_ms : left))
  DUR_MS=0
  if ((LIMIT_MS < MIN_STEP_MS)); then
    echo "not run: $(secs "$left") s left before the deadline" >"$log"
    RC=125
    return
  fi
  [[ "$FAKE" == 1 ]] && set -- "$WORK/fake-step.sh" "$name" "$@"
  local start
  start=$(now_ms)
  # In the background so that a signal to this script is handled at once (the trap below stops the step).
  (cd "${STEP_DIR:-$ROOT}" && exec timeout -k 2 "$(secs "$LIMIT_MS")" "$@") >"$log" 2>&1 </dev/null &
  CHILD=$!
  wait "$CHILD"
  RC=$?
  CHILD=""
  DUR_MS=$(($(now_ms) - start))
}

# The verdict of a step from RC and its log. Sets RESULT.
verdict() {
  local log=$1
  if ((RC == 125)); then RESULT="not run (deadline)"
  elif ((RC == 124 || RC == 137)); then RESULT="TIMED OUT (limit $(secs "$LIMIT_MS") s)"
  elif grep -q "\[GPU tests skipped" "$log" 2>/dev/null; then RESULT="SKIPPED (no GPU seen)"
  elif ((RC == 0)); then RESULT="passed"
  else RESULT="FAILED (exit $RC)"
  fi
}

last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -1; }
doctest_summary() {
  grep -E "^\[doctest\] (test cases|assertions):" "$1" 2>/dev/null | sed 's/\[doctest\] //; s/ *| */, /g; s/, *$//' | tr '\n' ' '
}

# step NAME CAP CMD...: run_step + verdict + row, with the log's last line as the note (NOTE overrides).
step() {
  local name=$1
  run_step "$@"
  verdict "$LOGS/$name.log"
  row "$name" "$RESULT" "${NOTE:-$(last_line "$LOGS/$name.log")}"
  [[ $RESULT == FAILED* || $RESULT == TIMED* ]] && tail_log "$LOGS/$name.log"
  NOTE=""
}

write_meta() {
  printf '{"date": %s, "commit": %s, "build": %s, "deadline_s": %s, "elapsed_s": %s, "fake": %s, "gpu": %s, "torch_venv": %s, "cudnn_dir": %s, "finished": %s}\n' \
    "$(json_str "$DATE")" "$(json_str "$COMMIT")" "$(json_str "$BUILD")" "$DEADLINE" \
    "$(secs $(($(now_ms) - T0_MS)))" "$([[ $FAKE == 1 ]] && echo true || echo false)" "$(json_str "${GPU:-not seen yet}")" \
    "$(json_str "$TORCH_VENV")" "$(json_str "${CUDNN_DIR:-}")" "${FINISHED:-false}" >"$WORK/meta.json"
}

LAST_PUBLISH_MS=0
publish() {
  LAST_PUBLISH_MS=$(now_ms)
  write_meta
  tar -czf "$OUT/.gpu-logs.tmp" -C "$WORK" logs 2>/dev/null && mv -f "$OUT/.gpu-logs.tmp" "$LOGTAR"
  if ! "$RPY" "$WORK/render.py" "$WORK" "$OUT/.gpu-results.tmp" "$OUT/.gpu-figures.tmp" >>"$LOGS/render.log" 2>&1; then
    # Without a working python the table is still the rows, and the JSON the rows alone.
    { echo "# GPU check $DATE (tools/gpu-check.sh; the full table needs python3)"; echo
      echo "| step | result | time | note |"; echo "| --- | --- | --- | --- |"; cat "$WORK/rows.md"; } >"$OUT/.gpu-results.tmp"
    { echo '{"rows": ['; paste -sd, "$WORK/rows.jsonl"; echo ']}'; } >"$OUT/.gpu-figures.tmp"
  fi
  mv -f "$OUT/.gpu-results.tmp" "$RESULT_MD"
  mv -f "$OUT/.gpu-figures.tmp" "$FIGJSON"
}

# A signal from outside (the device tool's own time limit): stop the step, keep what was done.
on_signal() {
  [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null
  DUR_MS=$(($(now_ms) - T0_MS))
  row "(stopped by a signal)" "FAILED" "the check was killed from outside after $(secs "$DUR_MS") s; the step running then has no row"
  publish
  exit 1
}
trap on_signal TERM INT HUP

# ---- the renderer: the table (with the targets) and the JSON of every figure ----
cat >"$WORK/render.py" <<'EOF'
import glob, json, os, sys
work, md_path, json_path = sys.argv[1:4]
def load(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return json.load(f)
    except Exception as e:
        return {"unreadable": str(e)} if os.path.exists(path) else None
meta = load(os.path.join(work, "meta.json")) or {}
rows = []
with open(os.path.join(work, "rows.jsonl"), encoding="utf-8", errors="replace") as f:
    for line in f:
        try:
            rows.append(json.loads(line))
        except Exception as e:
            rows.append({"step": "?", "result": "unreadable row", "note": str(e)})
figs = {os.path.basename(p)[:-5]: load(p) for p in sorted(glob.glob(os.path.join(work, "figures", "*.json")))}
def g(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None
def num(v, fmt="{:,.0f}"):
    return fmt.format(v) if v is not None else "n/a"
def verdict(v, ok):
    return "n/a" if v is None else ("PASS" if ok(v) else "FAIL")
bt, bf, bn, tb = figs.get("bench-tf32"), figs.get("bench-fp32"), figs.get("bench-tf32-nhwc"), figs.get("torch-bench")
bg = figs.get("bench-tf32-graph")
bb = figs.get("bench-bf16")
tr = lambda k, f="img_s": g(tb, "results", k, f)
ratio = lambda a, b: "{:.2f}x".format(a / b) if a and b else "n/a"
L = ["# GPU check {} (tools/gpu-check.sh)".format(meta.get("date", "?")), ""]
if meta.get("fake"):
    L += ["**FAKE RUN (VB_GPU_CHECK_FAKE=1): every GPU step was a stub; no figure here was measured.**", ""]
ver = figs.get("versions") or {}
L += ["GPU: {}. Commit {}. Build {}. Deadline {} s, {} s used{}.".format(
          meta.get("gpu"), meta.get("commit"), meta.get("build"), meta.get("deadline_s"), meta.get("elapsed_s"),
          "" if meta.get("finished") else " (still running or stopped early)"),
      "Loaded: cuDNN {}, cuBLAS {}, CUDA runtime {}, driver {}. PyTorch {} (its cuDNN {}).".format(
          ver.get("cudnn", "n/a"), ver.get("cublas", "n/a"), ver.get("cuda_runtime", "n/a"),
          ver.get("cuda_driver", "n/a"), (tb or {}).get("torch", "n/a"), (tb or {}).get("cudnn", "n/a")), "",
      "## Against the targets (issue 8; PyTorch measured in the same call)", "",
      "| figure | target | vbtrain | verdict | PyTorch here | vbtrain / PyTorch |", "| --- | --- | --- | --- | --- | --- |"]
t_img, t_peak, e_img = g(bt, "train_img_s"), g(bt, "peak_gib"), g(bt, "eval_img_s")
L += ["| training img/s, tf32, batch 150 | >= 2,073 | {} | {} | {} (defaults) | {} |".format(
          num(t_img), verdict(t_img, lambda v: v >= 2073), num(tr("train_fp32_default")), ratio(t_img, tr("train_fp32_default"))),
      "| training peak memory GiB, tf32 | <= 12.5 | {} | {} | {} | |".format(
          num(t_peak, "{:.2f}"), verdict(t_peak, lambda v: v <= 12.5), num(tr("train_fp32_default", "peak_gib"), "{:.2f}")),
      "| evaluation img/s, tf32 | >= 7,054 | {} | {} | {} | {} |".format(
          num(e_img), verdict(e_img, lambda v: v >= 7054), num(tr("eval_fp32_default")), ratio(e_img, tr("eval_fp32_default"))),
      "| training img/s, tf32, NHWC (VB_CUDA_LAYOUT=nhwc) | >= 2,073 | {} | {} | {} (defaults) | {} |".format(
          num(g(bn, "train_img_s")), verdict(g(bn, "train_img_s"), lambda v: v >= 2073), num(tr("train_fp32_default")),
          ratio(g(bn, "train_img_s"), tr("train_fp32_default"))),
      "| training img/s, tf32, captured step (VB_CUDA_GRAPH=1) | >= 2,073 | {} | {} | {} (defaults) | {} |".format(
          num(g(bg, "train_img_s")), verdict(g(bg, "train_img_s"), lambda v: v >= 2073), num(tr("train_fp32_default")),
          ratio(g(bg, "train_img_s"), tr("train_fp32_default"))),
      "| training img/s, strict fp32 | (PyTorch 868) | {} | | {} | {} |".format(
          num(g(bf, "train_img_s")), num(tr("train_fp32_strict")), ratio(g(bf, "train_img_s"), tr("train_fp32_strict"))),
      "| training img/s, bf16 (NHWC; issue 11's goal 8,000) | (PyTorch 4,174) | {} | | {} (bf16 + channels_last) | {} |".format(
          num(g(bb, "train_img_s")), num(tr("train_bf16_cl")), ratio(g(bb, "train_img_s"), tr("train_bf16_cl"))),
      "| evaluation img/s, bf16 | (PyTorch 14,166) | {} | | | |".format(num(g(bb, "eval_img_s"))),
      "", "vbtrain: mean of back-to-back steps after warm-up; PyTorch: median of CUDA-event-timed steps (its "
      "back-to-back figures are in the JSON). Peak memory: vbtrain's allocations with cuDNN's and cuBLAS's "
      "workspaces; PyTorch's max_memory_allocated.", "",
      "## Steps, in the order run", "", "| step | result | time | note |", "| --- | --- | --- | --- |"]
L += ["| {} | {} | {} s | {} |".format(r.get("step"), r.get("result"), r.get("seconds"), r.get("note")) for r in rows]
bd = [(p, figs.get("bench-" + p)) for p in ("tf32", "fp32", "tf32-nhwc", "tf32-graph", "bf16")]
if any(g(b, "breakdown_ms", "sum") for _, b in bd):
    L += ["", "## vbtrain bench: one training step by phase (ms; median, waiting after each phase)", "",
          "| precision | upload | forward + loss | backward | optimizer | sum | back-to-back step | peak GiB | device in use GiB |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, b in bd:
        if g(b, "breakdown_ms", "sum"):
            L.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(p, *[num(g(b, "breakdown_ms", k), "{:.2f}") for k in
                     ("upload", "forward_loss", "backward", "optimizer", "sum")], num(g(b, "train_ms"), "{:.2f}"),
                     num(g(b, "peak_gib"), "{:.2f}"), num(g(b, "device_used_gib"), "{:.2f}")))
vb = figs.get("vbbench") or {}
if isinstance(vb.get("rows"), list) and vb["rows"]:
    L += ["", "## vbbench (median ms; achieved rate and its fraction of the H200 peak that bounds it){}".format(
              "" if vb.get("complete", True) else " — stopped early by its time limit"), "",
          "| op | ms | achieved | of peak |", "| --- | --- | --- | --- |"]
    for r in vb["rows"]:
        rate = "{:,.0f} GB/s".format(r["GB/s"]) if r.get("GB/s") else "{:.1f} TFLOP/s".format(r.get("TFLOP/s") or 0)
        L.append("| {} | {:.3f} | {} | {:.1f}% of {} |".format(str(r.get("name", "")).strip(), r.get("ms", 0), rate,
                 100 * (r.get("fraction_of_peak") or 0), r.get("peak_of", "")))
    if vb.get("step_ms"):
        L += ["", "| per training step (layer times use count) | ms |", "| --- | --- |"]
        L += ["| {} | {:.2f} |".format(k, v) for k, v in vb["step_ms"].items()]
with open(md_path, "w", encoding="utf-8") as f:
    f.write("\n".join(L) + "\n")
with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "rows": rows, "figures": figs}, f, indent=1)
    f.write("\n")
EOF

: >"$WORK/rows.md"
: >"$WORK/rows.jsonl"
echo "gpu-check: deadline ${DEADLINE} s, build $BUILD, files into $OUT$([[ $FAKE == 1 ]] && echo '; FAKE: GPU steps are stubs')"
echo "| step | result | time | note |"
echo "| --- | --- | --- | --- |"

# ---- 0. the build ----
if [[ ! -x "$VBTRAIN" || "${VB_REBUILD:-0}" == 1 ]]; then
  STEP_DIR=$ROOT
  if [[ ! -f "$BUILD/build.ninja" ]]; then
    step configure 120 cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVB_CUDA_ARCHITECTURES=90
  fi
  [[ -f "$BUILD/build.ninja" ]] && step build 420 ninja -C "$BUILD"
  [[ -x "$VBTRAIN" ]] || { echo "gpu-check: no $VBTRAIN; stopping"; FINISHED=true; publish; exit 1; }
fi
# Test binaries find their fixtures through the source path compiled into them; a build carried from another
# checkout path gets a link at that path.
SRC_AT_BUILD=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD/CMakeCache.txt" 2>/dev/null)
if [[ -n "$SRC_AT_BUILD" && "$SRC_AT_BUILD" != "$ROOT" && ! -e "$SRC_AT_BUILD" ]]; then
  mkdir -p "$(dirname "$SRC_AT_BUILD")" && ln -s "$ROOT" "$SRC_AT_BUILD" && echo "gpu-check: linked $SRC_AT_BUILD -> $ROOT"
fi

# ---- 1. every binary finds its libraries ----
start=$(now_ms)
missing=""
nbin=0
for b in "$BUILD"/tools/vbtrain "$BUILD"/tools/vbbench "$BUILD"/tools/vbconvert "$BUILD"/tests/test_*; do
  [[ -f "$b" && -x "$b" ]] || continue
  nbin=$((nbin + 1))
  { echo "== $b"; ldd "$b" 2>&1; } >>"$LOGS/ldd.log"
  m=$(ldd "$b" 2>&1 | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')
  [[ -n "$m" ]] && missing+="$(basename "$b"): $m; "
done
DUR_MS=$(($(now_ms) - start))
if [[ -n "$missing" ]]; then
  row ldd "FAILED (libraries not found)" "$missing"
  echo "gpu-check: stopping: binaries that cannot load would fail every step (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
  FINISHED=true
  publish
  exit 1
fi
row ldd passed "$nbin binaries; cuDNN from $(grep -m1 -o 'libcudnn\.so[^ ]* => [^ ]*' "$LOGS/ldd.log" | sed 's/.*=> //')"

# ---- 2. what runs: libraries as loaded, the GPU, clocks, driver ----
if [[ -x "$VBBENCH" ]]; then
  run_step versions 30 "$VBBENCH" --versions --json "$FIG/versions.json"
  verdict "$LOGS/versions.log"
  GPU=$(sed -n 's/^gpu  *//p' "$LOGS/versions.log" | head -1)
  row versions "$RESULT" "$(grep -E '^(cudnn|cublas|cuda_driver|gpu) ' "$LOGS/versions.log" | sed 's/  */ /' | tr '\n' ';')"
else
  DUR_MS=0
  row versions "MISSING" "no $VBBENCH (a build without CUDA?)"
fi
if command -v nvidia-smi >/dev/null || [[ "$FAKE" == 1 ]]; then
  step nvidia-smi 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,memory.total,power.limit,temperature.gpu,persistence_mode,clocks_throttle_reasons.active --format=csv
  [[ -z "${GPU:-}" || "$GPU" == none* ]] && GPU=$(sed -n 2p "$LOGS/nvidia-smi.log" | cut -d, -f1-2)
else
  DUR_MS=0
  row nvidia-smi MISSING "no nvidia-smi on PATH"
fi

# ---- 3. compute-sanitizer over the CUDA op tests ----
CS=${VB_GPU_CHECK_SANITIZER:-}  # a compute-sanitizer of one's choice
if [[ -n "$CS" ]]; then :
elif [[ -x "$ROOT/.gpu-tools/compute-sanitizer/compute-sanitizer" ]]; then
  CS=$ROOT/.gpu-tools/compute-sanitizer/compute-sanitizer
elif [[ -f "$ROOT/.gpu-tools/compute-sanitizer.tar.xz" && "$FAKE" == 1 ]]; then
  CS="$ROOT/.gpu-tools/compute-sanitizer.tar.xz (not unpacked: fake run)"
elif [[ -f "$ROOT/.gpu-tools/compute-sanitizer.tar.xz" ]]; then
  mkdir -p "$WORK/tools"
  if tar -C "$WORK/tools" -xJf "$ROOT/.gpu-tools/compute-sanitizer.tar.xz" 2>>"$LOGS/sanitizer-unpack.log" ||
     "$RPY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
       "$ROOT/.gpu-tools/compute-sanitizer.tar.xz" "$WORK/tools" 2>>"$LOGS/sanitizer-unpack.log"; then
    CS=$WORK/tools/compute-sanitizer/compute-sanitizer
  fi
fi
[[ -z "$CS" ]] && CS=$(command -v compute-sanitizer || true)
[[ -z "$CS" && -x /usr/local/cuda/bin/compute-sanitizer ]] && CS=/usr/local/cuda/bin/compute-sanitizer
CUDA_OPS=$BUILD/tests/test_cuda_ops
CUDA_NHWC=$BUILD/tests/test_cuda_nhwc
sanitizer_step() {  # NAME CAP TOOL BINARY doctest-filters...
  local name=$1 cap=$2 tool=$3 bin=$4; shift 4
  run_step "$name" "$cap" "$CS" --tool "$tool" --error-exitcode 86 --print-limit 30 "$bin" "$@"
  verdict "$LOGS/$name.log"
  local log=$LOGS/$name.log summary
  summary=$(grep -m1 -o "ERROR SUMMARY: .*" "$log")
  # Judged on what it printed as well as its exit code: both the sanitizer's summary and doctest's.
  if [[ $RESULT == passed* || $RESULT == FAILED* ]] && [[ "$FAKE" != 1 ]]; then
    if [[ "$summary" == "ERROR SUMMARY: 0 errors"* ]] && grep -q "Status: SUCCESS" "$log"; then RESULT=passed
    elif [[ -n "$summary" && "$summary" != "ERROR SUMMARY: 0 errors"* ]]; then RESULT="FAILED ($summary)"
    elif [[ $RESULT == passed* ]]; then RESULT="FAILED (no clean summary from the sanitizer or doctest)"
    fi
    grep -q "\[GPU tests skipped" "$log" && RESULT="SKIPPED (no GPU seen)"
  fi
  row "$name" "$RESULT" "${summary:-$(last_line "$log")}; $(doctest_summary "$log")"
  [[ $RESULT == FAILED* || $RESULT == TIMED* ]] && tail_log "$log" 4
}
if [[ ! -x "$CUDA_OPS" ]]; then
  DUR_MS=0
  row compute-sanitizer MISSING "no $CUDA_OPS"
elif [[ -z "$CS" ]]; then
  DUR_MS=0
  row compute-sanitizer MISSING "not in .gpu-tools/ nor on PATH: run tools/fetch-gpu-tools.sh before carrying .gpu-tools"
else
  # Caps that leave the tests below most of the deadline even when the sanitizer is slow (220 s at most of 480):
  # a sanitizer that times out still reports what it found so far, a test step cut by the deadline reports nothing.
  sanitizer_step memcheck 100 memcheck "$CUDA_OPS" --test-case-exclude="*(large)*"
  sanitizer_step racecheck 60 racecheck "$CUDA_OPS" --test-case="*batch norm*,*softmax*,*pool*" --test-case-exclude="*(large)*"
  # The NHWC float and bf16 kernels of issue 11 (VB_CUDA_LAYOUT=nhwc; the bf16 mode): small shapes.
  [[ -x "$CUDA_NHWC" ]] && sanitizer_step memcheck-nhwc 60 memcheck "$CUDA_NHWC" --test-case-exclude="*(large)*"
fi

# ---- 4. every test binary, the CUDA op tests first ----
seen=" "
test_binary() {  # NAME CAP [ENV=VALUE...] BINARY: one test binary, once
  local name=$1 cap=$2; shift 2
  [[ "$seen" == *" $name "* ]] && return
  seen+="$name "
  run_step "$name" "$cap" env "$@"
  verdict "$LOGS/$name.log"
  row "$name" "$RESULT" "$(doctest_summary "$LOGS/$name.log")"
  [[ $RESULT == FAILED* || $RESULT == TIMED* ]] && tail_log "$LOGS/$name.log"
}
[[ -x "$CUDA_OPS" ]] && test_binary test_cuda_ops 180 "$CUDA_OPS"
[[ -x "$CUDA_NHWC" ]] && test_binary test_cuda_nhwc 120 "$CUDA_NHWC"
# The CUDA op tests again with the backend in NHWC (cuDNN on NHWC activations and KRSC filters, the NHWC
# batch norm and pooling kernels, the golden run), against the CPU backend in NHWC.
[[ -x "$CUDA_OPS" ]] && test_binary test_cuda_ops_nhwc 150 VB_CUDA_LAYOUT=nhwc "$CUDA_OPS"
for t in "$BUILD"/tests/test_*; do
  [[ -f "$t" && -x "$t" ]] && test_binary "$(basename "$t")" 120 "$t"
done

# ---- 5. parity with PyTorch at the same precision ----
WEIGHTS=$ROOT/tests/fixtures/mini_seed_b1_init.pth
GOLDEN=$ROOT/tests/fixtures/mini_train_golden.safetensors
for p in fp32 tf32 bf16; do
  if [[ ! -f "$ROOT/tools/torch_distances.py" ]]; then
    DUR_MS=0
    row "torch-distances-$p" MISSING "no tools/torch_distances.py in this checkout"
  else
    step "torch-distances-$p" 90 "$PY" "$ROOT/tools/torch_distances.py" --device cuda --precision $p --out "$FIG/dist-$p.json"
  fi
  against=()
  [[ -s "$FIG/dist-$p.json" ]] && against=(--against "$FIG/dist-$p.json")
  run_step "verify-$p" 90 "$VBTRAIN" verify --weights "$WEIGHTS" --reference "$GOLDEN" --device cuda --precision $p \
    "${against[@]}" --json "$FIG/verify-$p.json"
  verdict "$LOGS/verify-$p.log"
  note=$(last_line "$LOGS/verify-$p.log")
  if grep -qiE "(--against.*(not expected|unknown|extra))|((not expected|unknown|extra).*--against)" "$LOGS/verify-$p.log"; then
    note="this vbtrain has no --against yet: $note"
  elif [[ ${#against[@]} -eq 0 ]]; then
    note="without --against (no PyTorch distances): strict golden bounds; $note"
  fi
  row "verify-$p" "$RESULT" "$note"
  [[ $RESULT == FAILED* || $RESULT == TIMED* ]] && tail_log "$LOGS/verify-$p.log"
done
# bf16 tensor by tensor against PyTorch's own bf16 autocast run (the committed CPU one; the bounds of
# engine/golden.cpp's golden_tolerance for bf16 on CUDA).
run_step verify-bf16-autocast 90 "$VBTRAIN" verify --weights "$WEIGHTS" \
  --reference "$ROOT/tests/fixtures/mini_train_bf16_autocast.safetensors" --device cuda --precision bf16 \
  --json "$FIG/verify-bf16-autocast.json"
verdict "$LOGS/verify-bf16-autocast.log"
row verify-bf16-autocast "$RESULT" "$(last_line "$LOGS/verify-bf16-autocast.log")"
[[ $RESULT == FAILED* || $RESULT == TIMED* ]] && tail_log "$LOGS/verify-bf16-autocast.log"

# ---- 6. speed: vbtrain, vbbench, PyTorch, then the default run ----
# tf32-nhwc: the backend in NHWC (VB_CUDA_LAYOUT=nhwc), not yet the default: this row decides whether it becomes
# it, so it runs right after tf32's. tf32-graph: the training step captured as a CUDA graph (VB_CUDA_GRAPH=1),
# likewise not yet the default.
for p in tf32 tf32-nhwc tf32-graph bf16 fp32; do
  NOTE=""
  layout=nchw
  graph=0
  [[ $p == *-nhwc ]] && layout=nhwc
  [[ $p == *-graph ]] && graph=1
  run_step "bench-$p" 120 env VB_CUDA_LAYOUT=$layout VB_CUDA_GRAPH=$graph "$VBTRAIN" bench --device cuda --batch-size 150 \
    --precision "${p%-*}" --json "$FIG/bench-$p.json"
  verdict "$LOGS/bench-$p.log"
  row "bench-$p" "$RESULT" "$(grep -E '^(training step|evaluation|peak memory)' "$LOGS/bench-$p.log" | cut -d'(' -f1-2 | tr '\n' ';')"
  [[ $RESULT == FAILED* || $RESULT == TIMED* ]] && tail_log "$LOGS/bench-$p.log"
done
# The tools below get their own time limit too, so that they stop in time to write their JSON.
own_limit() { local l=$(( ($(left_ms) < $1 * 1000 ? $(left_ms) : $1 * 1000) / 1000 - 20 )); echo $((l > 5 ? l : 5)); }
if [[ -x "$VBBENCH" ]]; then
  # tf32 (the default path) and bf16 (cuDNN alone: what issue 11's bf16 step would get from its convolutions);
  # strict fp32 is the bench-fp32 row's.
  step vbbench 200 "$VBBENCH" --precision tf32,bf16 --warmup 1 --iters 5 --max-seconds "$(own_limit 200)" --json "$FIG/vbbench.json"
else
  DUR_MS=0
  row vbbench MISSING "no $VBBENCH"
fi
step torch-bench 150 "$PY" "$ROOT/tools/torch_bench.py" --max-seconds "$(own_limit 150)" --json "$FIG/torch-bench.json"

# The README's default run: what tools/run.sh runs after its setup step (which would try to install and
# rebuild), in a folder of its own; whatever time is left.
mkdir -p "$WORK/default"
STEP_DIR=$WORK/default
run_step default-run 100000 "$VBTRAIN" train --device cuda
STEP_DIR=""
verdict "$LOGS/default-run.log"
RUNDIR=$WORK/default/runs/default
for f in config.json metrics.jsonl test_metrics.json timing.json; do [[ -f "$RUNDIR/$f" ]] && cp "$RUNDIR/$f" "$LOGS/default-run-$f"; done
epochs=0
[[ -f "$RUNDIR/metrics.jsonl" ]] && epochs=$(wc -l <"$RUNDIR/metrics.jsonl")
acc=$(grep -o '"accuracy": *[0-9.eE+-]*' "$RUNDIR/test_metrics.json" 2>/dev/null | grep -o '[0-9.eE+-]*$')
printf '{"wall_s": %s, "epochs_done": %s, "test_accuracy": %s, "result": %s}\n' "$(secs "$DUR_MS")" "${epochs// /}" \
  "${acc:-null}" "$(json_str "$RESULT")" >"$FIG/default-run.json"
row default-run "$RESULT" "wall $(secs "$DUR_MS") s, $epochs epochs done, test accuracy ${acc:-n/a}; $(grep -m1 '^preset' "$LOGS/default-run.log")"
[[ $RESULT == FAILED* || $RESULT == TIMED* ]] && tail_log "$LOGS/default-run.log"

FINISHED=true
publish
echo
echo "gpu-check: done in $(secs $(($(now_ms) - T0_MS))) s of $DEADLINE, status $STATUS; files: $(cd "$OUT" && ls | tr '\n' ' ')"
sed -n '/^## Against the targets/,/^vbtrain: mean/p' "$RESULT_MD" | grep '^|'
exit $STATUS
