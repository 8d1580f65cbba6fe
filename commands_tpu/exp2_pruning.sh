#!/usr/bin/env bash
# TPU (PyTorch/XLA) version of commands_gpu/exp2_pruning.sh: same flags, same runs, plus use_tpu=true
# (one process per local TPU core, tpu_cores=auto: 8 on a v3-8; docs/tpu.md).
EXTRA_OVERRIDES="use_tpu=true ${EXTRA_OVERRIDES:-}" exec bash "$(dirname "$0")/../commands_gpu/exp2_pruning.sh" "$@"
