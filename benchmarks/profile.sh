#!/usr/bin/env bash
# The kernel profile of one MCMC step per precision variant, as one device call (docs/benchmarks.md):
#   here:   bash benchmarks/prepare_wheels.sh
#   device: run(command="TIMEOUT=200 bash benchmarks/profile.sh", carry=[".whl"], timeout_s=240)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
# torch.compile's warnings about diffusers' upsampler and Inductor's softmax fill the log: dropped.
device_run profile profile_step.py \
  "warn|originates|upsampling.py|is_torch_version|\^\^|online softmax|split the reduction|important use case|^softmax\.$" "$@"
