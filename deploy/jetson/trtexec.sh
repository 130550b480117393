#!/usr/bin/env bash
# Build a TensorRT engine from a gapcast bundle with trtexec: the command-line equivalent of
#   gapcast edge build-engine BUNDLE --precision fp16|int8|fp32 --max-batch N
# Shapes come from the bundle's card.json (batch 1..N, fixed lookback L and horizon H). Unlike `build-engine`,
# this does NOT verify the bundle signature, does NOT check the engine against golden.npz and does NOT fall back to
# another precision: verify first (`gapcast edge check` or verify_bundle) and compare outputs yourself.
#
# Usage: deploy/jetson/trtexec.sh BUNDLE_DIR [fp16|int8|fp32] [MAX_BATCH] [ENGINE_OUT]
#   fp16 (default): model.onnx with --fp16
#   int8:           model.int8.qdq.onnx (explicit quantization from the export's calibration) with --int8 --fp16
#   fp32:           model.onnx, TF32 disabled (--noTF32)
# trtexec lives in /usr/src/tensorrt/bin on JetPack (5.x: TensorRT 8.5; 6.0: 8.6; 6.1/6.2: 10.3).
set -euo pipefail

bundle=${1:?usage: trtexec.sh BUNDLE_DIR [fp16|int8|fp32] [MAX_BATCH] [ENGINE_OUT]}
precision=${2:-fp16}
max_batch=${3:-64}
trtexec=${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}
card="$bundle/card.json"
[[ -f "$card" ]] || { echo "no card.json in $bundle" >&2; exit 1; }
[[ -x "$trtexec" ]] || { echo "trtexec not found (set TRTEXEC=/path/to/trtexec)" >&2; exit 1; }

# L, C, L+H, F from the card (python3 ships with JetPack; no jq needed).
read -r L C LH F <<<"$(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))
ins = {i["name"]: i["shape"] for i in c["inputs"]}
print(ins["values"][1], ins["values"][2], ins["calendar"][1], ins["calendar"][2])' "$card")"

case "$precision" in
  fp16) onnx=model.onnx; flags=(--fp16) ;;
  int8) onnx=model.int8.qdq.onnx; flags=(--int8 --fp16) ;;
  fp32) onnx=model.onnx; flags=(--noTF32) ;;
  *) echo "precision must be fp16, int8 or fp32" >&2; exit 2 ;;
esac
[[ -f "$bundle/$onnx" ]] || { echo "$bundle has no $onnx (see excluded_variants in card.json)" >&2; exit 1; }

trt_version=$("$trtexec" --help 2>&1 | grep -oE 'TensorRT v[0-9]+' | head -1 | tr -dc '0-9' || true)
out=${4:-${bundle%/}.$precision.b$max_batch.engine}  # beside the bundle: the bundle stays as signed
shapes() { echo "values:$1x${L}x${C},observed:$1x${L}x${C},calendar:$1x${LH}x${F}"; }

# --memPoolSize takes MiB on TensorRT 8.x (8.4+) and 10.x; --timingCacheFile reuses tactic timings across builds.
exec "$trtexec" \
  --onnx="$bundle/$onnx" \
  --saveEngine="$out" \
  --minShapes="$(shapes 1)" \
  --optShapes="$(shapes "$max_batch")" \
  --maxShapes="$(shapes "$max_batch")" \
  --memPoolSize=workspace:1024 \
  --timingCacheFile="${TIMING_CACHE:-$(dirname "$bundle")/trt-timing${trt_version:+-v$trt_version}.cache}" \
  "${flags[@]}"
