#!/usr/bin/env bash
# Build a checkpoint into a bundle for a target (or a bundle made elsewhere, in place), verify the
# bundle against its golden tensors, and ask one question about the golden image.
#
#   examples/01_build_and_verify/build_and_verify.sh SOURCE WORKDIR [TARGET]
#
# SOURCE is a checkpoint (it has config.json: the bundle goes to WORKDIR/bundle) or a bundle.
# On a host without TensorRT the build stops with exit status 3 once the bundle is ready (the
# engines are built on the target): that is success here, and verify then checks the bundle's
# ONNX graphs in ONNX Runtime. With TensorRT and the target's GPU the engines are built (exit 0)
# and checked too (BACKEND=trt).
set -euo pipefail

source=${1:?usage: build_and_verify.sh SOURCE WORKDIR [TARGET]}
workdir=${2:?usage: build_and_verify.sh SOURCE WORKDIR [TARGET]}
target=${3:-orin-nx-16gb}
backend=${BACKEND:-ort}
mkdir -p "$workdir"

status=0
if [ -f "$source/config.json" ]; then
  bundle="$workdir/bundle"
  mvlm-compile build "$source" --target "$target" --out "$bundle" || status=$?
else
  bundle=$source
  mvlm-compile build "$bundle" --target "$target" || status=$?
fi
if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then
  exit "$status"
fi

# Exit status 1 when a component or the greedy tokens are beyond the recipe's tolerances.
mvlm-compile verify "$bundle" --golden "$bundle/golden" --backend "$backend" --task-items 10 \
  --report "$workdir/verify.json"

mvlm-compile run "$bundle" --backend "$backend" --image "$bundle/golden/image.png" \
  --prompt "How many shapes are there?"
