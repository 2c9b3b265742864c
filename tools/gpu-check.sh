#!/usr/bin/env bash
# The one check for a machine with a GPU (an NVIDIA H200 machine with PyTorch beside it):
#   1. builds if needed (or uses a carried build folder as it is),
#   2. runs every test binary (the GPU suites included),
#   3. `vbtrain verify` on the golden run in strict fp32 and tf32,
#   4. `vbtrain bench` (training step and evaluation, batch 150, tf32 and fp32),
#   5. vbbench (every custom kernel and ResNet-50 layer),
#   6. tools/torch_bench.py (PyTorch on the same machine, in the same run),
# then writes a dated markdown table: docs/gpu-results-YYYY-MM-DD.md, or into $OUT when set (with the logs).
#
# usage: tools/gpu-check.sh [build-folder]     (default: $VB_BUILD, else build-gpu, else build-cuda)
# The tests are the binaries CTest runs, run directly (a carried build's CTest files name another checkout).
# Keeps to a few minutes: every step has a time limit; a failing step is recorded and the script goes on.
# Exit status: 0 when tests, verify (both precisions) and every benchmark ran cleanly, 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-${VB_BUILD:-}}
if [[ -z "$BUILD" ]]; then
  if [[ -x "$ROOT/build-gpu/tools/vbtrain" ]]; then BUILD=$ROOT/build-gpu
  elif [[ -x "$ROOT/build-cuda/tools/vbtrain" ]]; then BUILD=$ROOT/build-cuda
  else BUILD=$ROOT/build-gpu
  fi
fi
DATE=$(date -u +%Y-%m-%d)
if [[ -n "${OUT:-}" ]]; then DEST=$OUT; else DEST=$ROOT/docs; fi
mkdir -p "$DEST"
RESULT=$DEST/gpu-results-$DATE.md
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# PyTorch's environment carries cuDNN 9.19; the system has 9.14. The newer one first (gpu-target.md).
TORCH_VENV=${TORCH_VENV:-/opt/torch/.venv}
CUDNN_DIR=$(ls -d "$TORCH_VENV"/lib/python3*/site-packages/nvidia/cudnn/lib 2>/dev/null | head -1)
[[ -n "$CUDNN_DIR" ]] && export LD_LIBRARY_PATH="$CUDNN_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
PY=$TORCH_VENV/bin/python
[[ -x "$PY" ]] || PY=python3

status=0
note() { echo "== $*"; }
LOGS=${OUT:-$BUILD/gpu-check-logs}
mkdir -p "$BUILD" "$LOGS"

# ---- 1. build ----
# A build folder that already holds the binaries is used as it is (a folder carried from another machine
# may name compilers and paths that do not exist here); VB_REBUILD=1 brings it up to date first.
if [[ ! -x "$BUILD/tools/vbtrain" ]]; then
  note "configuring and building in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVB_CUDA_ARCHITECTURES=90 >"$LOGS/build.log" 2>&1 &&
    timeout 600 ninja -C "$BUILD" >>"$LOGS/build.log" 2>&1 || { echo "build failed:"; tail -30 "$LOGS/build.log"; exit 1; }
elif [[ "${VB_REBUILD:-0}" == 1 ]]; then
  note "bringing $BUILD up to date"
  timeout 600 ninja -C "$BUILD" >"$LOGS/build.log" 2>&1 || { echo "build failed:"; tail -30 "$LOGS/build.log"; exit 1; }
else
  note "using the binaries in $BUILD as they are (VB_REBUILD=1 to rebuild)"
fi
# Test binaries find their fixtures through the source path compiled into them; a build carried from another
# checkout path gets a link at that path.
SRC_AT_BUILD=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD/CMakeCache.txt" 2>/dev/null)
if [[ -n "$SRC_AT_BUILD" && "$SRC_AT_BUILD" != "$ROOT" && ! -e "$SRC_AT_BUILD" ]]; then
  mkdir -p "$(dirname "$SRC_AT_BUILD")" && ln -s "$ROOT" "$SRC_AT_BUILD" && note "linked $SRC_AT_BUILD -> $ROOT"
fi
VBTRAIN=$BUILD/tools/vbtrain
VBBENCH=$BUILD/tools/vbbench
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$LOGS/gpu.txt" 2>&1
  GPU=$(head -1 "$LOGS/gpu.txt")
else
  GPU="none seen (no nvidia-smi)"
fi
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]] && COMMIT="$COMMIT (with local changes)"

# ---- 2. tests ----
: >"$WORK/tests.md"
for t in "$BUILD"/tests/test_*; do
  [[ -x "$t" && -f "$t" ]] || continue
  name=$(basename "$t")
  note "test $name"
  start=$(date +%s)
  (cd "$ROOT" && timeout 300 "$t") >"$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  if grep -q "\[GPU tests skipped" "$LOGS/$name.log"; then res="SKIPPED (no GPU seen)"; status=1
  elif [[ $rc -eq 0 ]]; then res="passed"
  else res="FAILED (exit $rc)"; status=1; tail -25 "$LOGS/$name.log"
  fi
  summary=$(grep -E "^\[doctest\] (test cases|assertions):" "$LOGS/$name.log" | sed 's/\[doctest\] //; s/ *| */, /g; s/, *$//' | tr '\n' ' ')
  echo "| $name | $res | ${secs} s | $summary |" >>"$WORK/tests.md"
done

# ---- 3. verify ----
: >"$WORK/verify.md"
for prec in fp32 tf32; do
  note "verify $prec"
  timeout 120 "$VBTRAIN" verify --weights "$ROOT/tests/fixtures/mini_seed_b1_init.pth" \
    --reference "$ROOT/tests/fixtures/mini_train_golden.safetensors" --device cuda --precision $prec \
    --json "$LOGS/verify-$prec.json" >"$LOGS/verify-$prec.log" 2>&1
  rc=$?
  [[ $rc -eq 0 ]] || { status=1; tail -15 "$LOGS/verify-$prec.log"; }
  echo "| $prec | $([[ $rc -eq 0 ]] && echo passed || echo "FAILED (exit $rc)") | $(tail -1 "$LOGS/verify-$prec.log") |" >>"$WORK/verify.md"
done

# ---- 4. vbtrain bench ----
for prec in tf32 fp32; do
  note "vbtrain bench $prec"
  timeout 240 "$VBTRAIN" bench --device cuda --batch-size 150 --precision $prec --steps 30 \
    --json "$WORK/bench-$prec.json" >"$LOGS/bench-$prec.log" 2>&1 || { status=1; tail -15 "$LOGS/bench-$prec.log"; }
done

# ---- 5. vbbench ----
note "vbbench"
timeout 300 "$VBBENCH" --warmup 1 --iters 5 --json "$WORK/vbbench.json" >"$LOGS/vbbench.log" 2>&1 || { status=1; tail -15 "$LOGS/vbbench.log"; }

# ---- 6. PyTorch ----
note "torch_bench.py"
timeout 300 "$PY" "$ROOT/tools/torch_bench.py" --json "$WORK/torch.json" >"$LOGS/torch.log" 2>&1 ||
  { status=1; tail -15 "$LOGS/torch.log"; }

# ---- the table ----
"$PY" - "$WORK" "$RESULT" "$DATE" "$GPU" "$COMMIT" <<'EOF'
import json, os, sys
work, result, date, gpu, commit = sys.argv[1:6]
def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except Exception:
        return None
def num(v, fmt="{:,.0f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "n/a"
bt, bf, vb, th = load("bench-tf32.json"), load("bench-fp32.json"), load("vbbench.json"), load("torch.json")
tr = (th or {}).get("results", {})
def row(label, ours, ours_key, theirs, mem_key="peak_gib"):
    o = ours or {}
    t = tr.get(theirs, {})
    ratio = (o.get(ours_key) / t["img_s"]) if o.get(ours_key) and t.get("img_s") else None
    return "| {} | {} | {} | {} | {} | {} |".format(label, num(o.get(ours_key)), num(t.get("img_s")),
        num(ratio, "{:.2f}x"), num(o.get(mem_key), "{:.2f}") if mem_key else "(the training run's)",
        num(t.get("peak_gib"), "{:.2f}"))
L = ["# GPU results {} (tools/gpu-check.sh)".format(date), "",
     "GPU: {}. Commit {}. vbtrain: {}. PyTorch {} (cuDNN {}).".format(gpu, commit, (bt or {}).get("device", "n/a"),
         (th or {}).get("torch", "n/a"), (th or {}).get("cudnn", "n/a")), "",
     "ResNet-50, 8-class head, batch 150, 224x224, random data, AdamW + weighted cross-entropy; vbtrain: median "
     "of 30 steps after 5 warm-up; PyTorch: median of 20 after 5 (CUDA events). Peak memory: vbtrain's own "
     "allocations and workspaces; PyTorch's torch.cuda.max_memory_allocated. Targets (issue 4): tf32 training "
     ">= 2,073 img/s within 12.5 GiB; evaluation >= 7,054 img/s.", "",
     "| configuration | vbtrain img/s | PyTorch img/s | ratio | vbtrain peak GiB | PyTorch peak GiB |",
     "| --- | --- | --- | --- | --- | --- |",
     row("training, tf32 (vbtrain) vs PyTorch fp32 defaults (TF32 convs)", bt, "train_img_s", "train_fp32_default"),
     row("training, strict fp32", bf, "train_img_s", "train_fp32_strict"),
     row("evaluation, tf32 (vbtrain) vs PyTorch fp32 defaults", bt, "eval_img_s", "eval_fp32_default", None),
     row("evaluation, strict fp32 (vbtrain) vs PyTorch fp32 defaults", bf, "eval_img_s", "eval_fp32_default", None),
     "", "## Tests", "", "| binary | result | time | doctest |", "| --- | --- | --- | --- |"]
L += open(os.path.join(work, "tests.md")).read().splitlines()
L += ["", "## verify (golden run on the GPU)", "", "| precision | result | summary |", "| --- | --- | --- |"]
L += open(os.path.join(work, "verify.md")).read().splitlines()
if vb:
    L += ["", "## vbbench per-step totals (distinct layers times their use count)", "", "| what | ms |", "| --- | --- |"]
    L += ["| {} | {:.2f} |".format(k, v) for k, v in vb.get("step_ms", {}).items()]
    L += ["", "## vbbench (median ms; GB/s against ~4,800, TFLOP/s against ~495 TF32 / ~67 FP32)", "",
          "| op | ms | GB/s | TFLOP/s |", "| --- | --- | --- | --- |"]
    L += ["| {} | {:.3f} | {} | {} |".format(r["name"].strip(), r["ms"], num(r["GB/s"], "{:.0f}") if r["GB/s"] else "",
          num(r["TFLOP/s"], "{:.1f}") if r["TFLOP/s"] else "") for r in vb.get("rows", [])]
else:
    L += ["", "vbbench: no results (see its log)."]
with open(result, "w") as f:
    f.write("\n".join(L) + "\n")
print("wrote " + result)
EOF
[[ $? -eq 0 ]] || status=1
note "done (status $status); logs in $LOGS"
[[ -n "${OUT:-}" ]] || cat "$RESULT"
exit $status
