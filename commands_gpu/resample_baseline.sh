#!/usr/bin/env bash
# exp 5 baseline: ReSample (500 DDIM steps, DPS, hard data consistency, stochastic resampling) on the
# same operator, images, checkpoints and particle streams as exp 0. Preset: configs/experiment/resample.yaml.
source "$(dirname "$0")/_common.sh"
USAGE="usage: $0 [--imagenet] [--ffhq] --1|--10|--100 [overrides...]   (first 1/10/100 images; flags combine)
  The official batch coupling instead of per-particle optimisation: $0 --10 resample.coupling=faithful name=...
  The embedded demo instead of real data/checkpoints: $0 --1 data=demo model=toy"
run_experiment resample_baseline "$USAGE" "1 10 100" -- experiment=resample :: "$@"
