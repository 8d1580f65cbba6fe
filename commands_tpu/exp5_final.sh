#!/usr/bin/env bash
# TPU (PyTorch/XLA) version of commands_gpu/exp5_final.sh: same flags, same runs, plus use_tpu=true.
EXTRA_OVERRIDES="use_tpu=true ${EXTRA_OVERRIDES:-}" exec bash "$(dirname "$0")/../commands_gpu/exp5_final.sh" "$@"
