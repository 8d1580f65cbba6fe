#!/usr/bin/env bash
# TPU (PyTorch/XLA) version of commands_gpu/resample_baseline.sh: same flags, same runs, plus use_tpu=true.
EXTRA_OVERRIDES="use_tpu=true ${EXTRA_OVERRIDES:-}" exec bash "$(dirname "$0")/../commands_gpu/resample_baseline.sh" "$@"
