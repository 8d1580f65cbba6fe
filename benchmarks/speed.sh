#!/usr/bin/env bash
# The speed benchmark, as one device call (docs/benchmarks.md, "Performance"):
#   here:   bash benchmarks/prepare_wheels.sh
#   device: run(command="TIMEOUT=480 bash benchmarks/speed.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
device_run speed speed.py "" "$@"
