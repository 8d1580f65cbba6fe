#!/usr/bin/env bash
# The GPU check, as one device call (see benchmarks/README.md):
#   here:   bash benchmarks/prepare_wheels.sh
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
source benchmarks/device_env.sh
PYTHONUNBUFFERED=1 timeout "${TIMEOUT:-500}" python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
