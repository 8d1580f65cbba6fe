#!/usr/bin/env bash
# The kernel profile of one MCMC step per precision variant, as one device call (docs/benchmarks.md):
#   here:   bash benchmarks/prepare_wheels.sh
#   device: run(command="TIMEOUT=200 bash benchmarks/profile.sh", carry=[".whl"], timeout_s=240)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-profile_out}"
mkdir -p "$OUT"
source benchmarks/device_env.sh
PYTHONUNBUFFERED=1 timeout "${TIMEOUT:-500}" python3 benchmarks/profile_step.py --out "$OUT" "$@" 2>&1 \
  | grep -v -i -E "warn|originates|upsampling.py|is_torch_version|\^\^|online softmax|split the reduction|important use case|^softmax\.$" \
  | tee "$OUT/profile.log"
