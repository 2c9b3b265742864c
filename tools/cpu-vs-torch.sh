#!/usr/bin/env bash
# vbtrain's CPU path next to PyTorch's on this machine: the table of issue 10 (training / evaluation img/s,
# median of the timed steps, same model, AdamW + weighted CE, PyTorch in channels_last), printed as Markdown
# with the ratios vbtrain / PyTorch.
#
#   tools/cpu-vs-torch.sh [--build DIR] [--rows small|full|all] [--threads "1 2"] [--steps N] [--warmup N]
#                         [--repeat N]
#
# Rows: "full" = ResNet-50 ([3,4,6,3] width 64), batch 8, 224x224; "small" = the default run's CPU preset
# ([1,1,1,1] width 16), batch 32, 64x64. The PyTorch side is tools/torch_cpu_bench.py, run with $VB_TORCH_PYTHON when
# set, else /opt/torchcpu/bin/python or python3; when none of them imports torch, vbtrain's figures are printed
# alone and the script says so. Each row runs vbtrain then PyTorch back to back, so on a busy machine both
# see about the same load; the figures are still only as quiet as the machine. --repeat N alternates the two
# N times per row and keeps each side's best training and best evaluation figure (for a busy machine).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
build="$root/build"
rows=all
threads="1 2"
steps=5
warmup=2
repeat=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --rows) rows="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    -h|--help) sed -n "2,14p" "$0"; exit 0 ;;
    *) echo "cpu-vs-torch: unknown argument $1" >&2; exit 2 ;;
  esac
done
vbtrain="$build/tools/vbtrain"
[[ -x "$vbtrain" ]] || { echo "cpu-vs-torch: $vbtrain not found (build first: tools/setup.sh)" >&2; exit 2; }

py=""
cands=(/opt/torchcpu/bin/python python3)
[[ -n "${VB_TORCH_PYTHON:-}" ]] && cands=("$VB_TORCH_PYTHON")  # when set, the only one tried
for cand in "${cands[@]}"; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then py="$cand"; break; fi
done
if [[ -z "$py" ]]; then
  echo "cpu-vs-torch: PyTorch is not installed (no ${VB_TORCH_PYTHON:-/opt/torchcpu/bin/python or python3} that imports torch):" \
       "printing vbtrain's figures only (pip install torch --index-url https://download.pytorch.org/whl/cpu to compare)" >&2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
field() { sed -n "s/.*\"$2\": *\([0-9.eE+-]*\).*/\1/p" "$1" | head -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (b == "" || a > b) ? a : b }'; }
fmt() { awk -v a="$1" 'BEGIN { if (a >= 100) printf "%.0f", a; else printf "%.2f", a }'; }

case "$rows" in
  small) configs=(small) ;;
  full) configs=(full) ;;
  all) configs=(full small) ;;
  *) echo "cpu-vs-torch: --rows is small, full or all" >&2; exit 2 ;;
esac

echo "# vbtrain vs PyTorch on the CPU, $(date -u +%Y-%m-%d) ($(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); median of $steps steps after $warmup, best of $repeat)"
[[ -n "$py" ]] && echo "PyTorch: $("$py" -c 'import torch; print(torch.__version__)') via $py, channels_last"
echo
echo "| model | threads | vbtrain train / eval img/s | PyTorch train / eval img/s | vbtrain ÷ PyTorch |"
echo "| --- | --- | --- | --- | --- |"
for c in "${configs[@]}"; do
  if [[ "$c" == full ]]; then
    args=(--blocks 3,4,6,3 --width 64 --image-size 224 --batch-size 8); name="ResNet-50, batch 8, 224×224"
  else
    args=(--blocks 1,1,1,1 --width 16 --image-size 64 --batch-size 32); name="[1,1,1,1] width 16, batch 32, 64×64"
  fi
  for t in $threads; do
    vt=""; ve=""; pt=""; pe=""
    for ((r = 0; r < repeat; ++r)); do
      "$vbtrain" bench --device cpu --threads "$t" --steps "$steps" --warmup "$warmup" "${args[@]}" \
        --json "$tmp/vb.json" >"$tmp/vb.log"
      vt="$(best "$(field "$tmp/vb.json" train_img_s)" "$vt")"; ve="$(best "$(field "$tmp/vb.json" eval_img_s)" "$ve")"
      if [[ -n "$py" ]]; then
        "$py" "$here/torch_cpu_bench.py" --threads "$t" --steps "$steps" --warmup "$warmup" "${args[@]}" \
          --json "$tmp/pt.json" >"$tmp/pt.log"
        pt="$(best "$(field "$tmp/pt.json" train_img_s)" "$pt")"; pe="$(best "$(field "$tmp/pt.json" eval_img_s)" "$pe")"
      fi
    done
    if [[ -n "$py" ]]; then
      echo "| $name | $t | $(fmt "$vt") / $(fmt "$ve") | $(fmt "$pt") / $(fmt "$pe") | $(ratio "$vt" "$pt") / $(ratio "$ve" "$pe") |"
    else
      echo "| $name | $t | $(fmt "$vt") / $(fmt "$ve") | (no PyTorch) | - |"
    fi
  done
done
