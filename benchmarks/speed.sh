#!/usr/bin/env bash
# The speed benchmark on the GPU machine, as two device calls (docs/benchmarks.md, "Performance"):
#   here:   bash benchmarks/prepare_wheels.sh
#   device: run(command="TIMEOUT=490 bash benchmarks/speed.sh --only step image", carry=[".whl"], timeout_s=530)
#           run(command="TIMEOUT=360 bash benchmarks/speed.sh --only accuracy throughput --fast cg --image-from <call 1's speed.json, committed>", carry=[".whl"], timeout_s=400)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
device_run speed speed.py "" "$@"
