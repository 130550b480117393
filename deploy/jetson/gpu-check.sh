#!/usr/bin/env bash
# One prepared GPU check: on whatever NVIDIA machine this is (a Jetson, a CUDA server), run everything the machine
# can run and report what it could not (python -m gapcast.tools.gpucheck: see its docstring for the parts):
#   pytest -m gpu; TensorRT engines fp32/fp16/int8 from a freshly exported bundle with the golden check (where
#   `import tensorrt` works); onnxruntime with the CUDA / TensorRT execution providers (where this build has them);
#   a few torch CUDA training steps (DDP on NCCL, one process); each engine/provider timed at batch 1/64/256
#   against onnxruntime CPU; gpu-check.json + gpu-check.md.
#
# Usage (from a checkout, after `make venv` or with a venv that has gapcast[train,edge,dev]):
#   deploy/jetson/gpu-check.sh [OUT_DIR] [--bundle PATH] [--budget-s 450]
# Installs nothing, needs no network, ends within 8 minutes (the Python part has a 450 s bound, this wrapper kills
# it at 470 s), exits 0 with a "not available here: ..." line for each part it could not run (1 if a part that ran
# failed). Python: $GAPCAST_PYTHON, else the checkout's .venv, else /opt/gapcast/venv, else python3.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="gpu-check-out"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT="$1"; shift; fi
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac

PY="${GAPCAST_PYTHON:-}"
for candidate in "$REPO/.venv/bin/python" /opt/gapcast/venv/bin/python python3; do
    [ -n "$PY" ] && break
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; fi
done
"$PY" -c 'import gapcast' 2>/dev/null || { echo "gpu-check.sh: $PY cannot import gapcast (make venv first)" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L || echo "note: no nvidia-smi on PATH (a Jetson has none: tegrastats)"
[ -r /etc/nv_tegra_release ] && head -n1 /etc/nv_tegra_release

cd "$REPO"
if [ -z "${GAPCAST_DATA:-}" ] && [ -d "$REPO/../shared/data" ]; then
    GAPCAST_DATA="$(cd "$REPO/../shared/data" && pwd)"
    export GAPCAST_DATA
fi
timeout --signal=TERM --kill-after=10 470 "$PY" -m gapcast.tools.gpucheck --out "$OUT" "$@"
