#!/usr/bin/env bash
# The GPU check, as one device call (see benchmarks/README.md):
#   here:   bash benchmarks/prepare_wheels.sh
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".shared"], timeout_s=540)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
device_run gpu_check gpu_check.py "" "$@"
