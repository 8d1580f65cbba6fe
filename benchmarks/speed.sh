#!/usr/bin/env bash
# The speed benchmark, as one device call (docs/benchmarks.md, "Performance"):
#   here:   bash benchmarks/prepare_wheels.sh
#   device: run(command="bash benchmarks/speed.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-speed_out}"
mkdir -p "$OUT"
source benchmarks/device_env.sh
PYTHONUNBUFFERED=1 timeout "${TIMEOUT:-500}" python3 benchmarks/speed.py --out "$OUT" "$@" 2>&1 | tee "$OUT/speed.log"
