#!/usr/bin/env bash
# The CI golden gate: build BUNDLE's engines on this machine (BACKEND=trt, the default: a Jetson
# runner), then verify them against the golden tensors and write the JSON report and the JUnit XML
# into REPORTS (verify.json, verify.xml). The exit status is verify's: 1 when an output is beyond
# the recipe's tolerance, 2 for a broken bundle, so the job fails; publish the JUnit either way.
#
#   TARGET=orin-nx-16gb examples/05_ci_golden_gate/golden_gate.sh BUNDLE REPORTS
#
# BACKEND=ort verifies the bundle's ONNX graphs in ONNX Runtime instead (any host, no engines).
# GOLDEN (default BUNDLE/golden) is the golden directory; PLUGIN the PEG plugin library, when the
# engines are built with one that is not this installation's `make plugin`.
set -euo pipefail

bundle=${1:?usage: golden_gate.sh BUNDLE REPORTS}
reports=${2:?usage: golden_gate.sh BUNDLE REPORTS}
backend=${BACKEND:-trt}
golden=${GOLDEN:-$bundle/golden}
mkdir -p "$reports"

if [ "$backend" = trt ]; then
  # Stages done on the host are skipped; only the engines are built (or rebuilt when stale).
  mvlm-compile build "$bundle" --target "${TARGET:?set TARGET to the target profile, e.g. orin-nx-16gb}" \
    ${PLUGIN:+--plugin "$PLUGIN"}
fi
mvlm-compile verify "$bundle" --golden "$golden" --backend "$backend" ${PLUGIN:+--plugin "$PLUGIN"} \
  --report "$reports/verify.json"
