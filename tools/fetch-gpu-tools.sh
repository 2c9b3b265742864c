#!/usr/bin/env bash
# Fetches the tools the GPU machine lacks into .gpu-tools/ (ignored by git; carry it to the GPU machine with
# the build, see docs/STATUS.md). Today that is compute-sanitizer for CUDA 13, from PyPI's
# nvidia-cuda-sanitizer-api wheel, packed as .gpu-tools/compute-sanitizer.tar.xz (about 6 MB instead of 28, so
# that it fits the device tool's 64 MiB carry limit beside the build); tools/gpu-check.sh unpacks it there.
#
# Why not the wheel as it is: it puts the injection libraries in lib/ while compute-sanitizer preloads them
# from its own folder, and it lacks TreeLauncherSubreaper, the helper compute-sanitizer execs to start the
# target (without it every run ends with "Execve of subreaper failed" and exit 255). So the archive holds
# the binary and every library in one folder, as the CUDA toolkit installs them, plus a small replacement
# subreaper built here (static, so it runs on the GPU machine's glibc): it becomes a child subreaper, runs
# the target (its last argument is the program, the ones before are the program's arguments, as
# compute-sanitizer passes them) and exits with the target's status once every descendant has ended.
#
# usage: tools/fetch-gpu-tools.sh            (re-fetches only when the archive is missing; -f to force)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=$ROOT/.gpu-tools
ARCHIVE=$DEST/compute-sanitizer.tar.xz
VERSION=${VB_SANITIZER_VERSION:-13.0.*}  # the GPU machine's driver is CUDA 13.0

if [[ -f "$ARCHIVE" && "${1:-}" != "-f" ]]; then
  echo "fetch-gpu-tools: $ARCHIVE is there (-f to fetch again)"
else
  mkdir -p "$DEST"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  PIP=(pip)
  command -v pip >/dev/null || PIP=(python3 -m pip)
  "${PIP[@]}" download --quiet --no-deps "nvidia-cuda-sanitizer-api==$VERSION" -d "$TMP/wheel"
  WHEEL=$(ls "$TMP"/wheel/nvidia_cuda_sanitizer_api-*.whl | head -1)
  mkdir -p "$TMP/unzip" "$TMP/pack/compute-sanitizer"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$WHEEL" "$TMP/unzip"
  BIN=$TMP/unzip/nvidia/cu13
  [[ -f "$BIN/bin/compute-sanitizer" ]] || { echo "fetch-gpu-tools: no nvidia/cu13/bin/compute-sanitizer in $(basename "$WHEEL")" >&2; exit 1; }
  OUTD=$TMP/pack/compute-sanitizer
  cp "$BIN/bin/compute-sanitizer" "$BIN"/bin/*.so "$OUTD/"
  cp -n "$BIN"/lib/*.so "$OUTD/"
  cat >"$TMP/subreaper.c" <<'EOF'
/* Stands in for the toolkit's TreeLauncherSubreaper (see tools/fetch-gpu-tools.sh). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char** argv) {
  if (argc < 2) { fprintf(stderr, "TreeLauncherSubreaper: no target\n"); return 127; }
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  char** targv = calloc((size_t)argc, sizeof(char*));
  if (!targv) return 127;
  targv[0] = argv[argc - 1];
  for (int i = 1; i < argc - 1; ++i) targv[i] = argv[i];
  pid_t child = fork();
  if (child < 0) { perror("TreeLauncherSubreaper: fork"); return 127; }
  if (child == 0) { execvp(targv[0], targv); perror(targv[0]); _exit(127); }
  int status = 0, result = 127;
  for (;;) {
    pid_t p = wait(&status);
    if (p < 0) { if (errno == EINTR) continue; break; }
    if (p == child) result = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  return result;
}
EOF
  ${CC:-cc} -O2 -static -o "$OUTD/TreeLauncherSubreaper" "$TMP/subreaper.c"
  chmod +x "$OUTD/compute-sanitizer" "$OUTD/TreeLauncherSubreaper"
  basename "$WHEEL" >"$OUTD/FROM-WHEEL"
  tar -C "$TMP/pack" -cJf "$ARCHIVE.tmp" compute-sanitizer
  mv "$ARCHIVE.tmp" "$ARCHIVE"
  echo "fetch-gpu-tools: wrote $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1), from $(basename "$WHEEL"))"
fi

# The check that can be made without a GPU: it unpacks, runs, and starts a target through the subreaper.
CHECK=$(mktemp -d)
tar -C "$CHECK" -xJf "$ARCHIVE"
"$CHECK/compute-sanitizer/compute-sanitizer" --version | grep -i version
out=$("$CHECK/compute-sanitizer/compute-sanitizer" --tool memcheck /bin/echo vb-sanitizer-launch-ok 2>&1 || true)
rm -rf "$CHECK"
if grep -q vb-sanitizer-launch-ok <<<"$out"; then
  echo "fetch-gpu-tools: compute-sanitizer starts a target here (no GPU: it can check nothing more)"
else
  echo "fetch-gpu-tools: compute-sanitizer did not start a target:" >&2
  echo "$out" >&2
  exit 1
fi
