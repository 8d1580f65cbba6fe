#!/usr/bin/env bash
# exp 0: LatentDAPS (Langevin), 4 independent particles, repulsion 0 (exp 0b: DAPS's released HMC).
source "$(dirname "$0")/_common.sh"
USAGE="usage: $0 --1|--10|--100 [--hmc] [overrides...]   (ImageNet first 1/10/100 images; flags combine)
  --hmc runs exp 0b (DAPS's released HMC setting) instead of the Langevin exp 0.
  The embedded demo instead of real data/checkpoints: $0 --1 data=demo model=toy"
exp=exp0_baseline preset=exp0 args=()
for a in "$@"; do if [[ "$a" == --hmc ]]; then exp=exp0b_hmc preset=exp0b; else args+=("$a"); fi; done
run_experiment "$exp" "$USAGE" "1 10 100" -- "experiment=$preset" num_samples=4 repulsion_scale=0 \
  pruning_step=-1 optimization_step=-1 :: "${args[@]}"
