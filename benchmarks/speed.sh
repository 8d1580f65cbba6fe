#!/usr/bin/env bash
# The speed benchmark, as one device call (docs/benchmarks.md, "Performance"):
#   here:   bash benchmarks/prepare_wheels.sh
#   device: run(command="bash benchmarks/speed.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-speed_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD" || { echo "wheel install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
PYTHONUNBUFFERED=1 timeout 500 python3 benchmarks/speed.py --out "$OUT" "$@" 2>&1 | tee "$OUT/speed.log"
