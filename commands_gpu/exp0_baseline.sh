#!/usr/bin/env bash
# exp 0: LatentDAPS (Langevin), 4 independent particles, repulsion 0 (exp 0b: DAPS's released HMC;
# exp 0c: the checkpoint's own noise schedule). Presets: configs/experiment/exp0*.yaml.
source "$(dirname "$0")/_common.sh"
USAGE="usage: $0 --1|--10|--100 [--hmc|--own-schedule] [overrides...]   (ImageNet first 1/10/100 images; flags combine)
  --hmc runs exp 0b (DAPS's released HMC setting) instead of the Langevin exp 0.
  --own-schedule runs exp 0c (the checkpoint's own noise schedule instead of DAPS's sigma -> t mapping).
  The embedded demo instead of real data/checkpoints: $0 --1 data=demo model=toy"
exp=exp0_baseline preset=exp0 args=()
for a in "$@"; do
  case "$a" in
    --hmc) exp=exp0b_hmc preset=exp0b ;;
    --own-schedule) exp=exp0c_own_schedule preset=exp0c ;;
    *) args+=("$a") ;;
  esac
done
run_experiment "$exp" "$USAGE" "1 10 100" -- "experiment=$preset" :: "${args[@]}"
