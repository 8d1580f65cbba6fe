#!/usr/bin/env bash
# exp 4: best of exps 1-3 (default exp 2) + ReSample-style latent optimisation from t = 200.
# Another base: append e.g. pruning_step=-1 (exp 1 + optimisation); presets: search.optimization.preset=weak|dense.
source "$(dirname "$0")/_common.sh"
USAGE="usage: $0 --1|--10|--100 [overrides...]   (ImageNet first 1/10/100 images; flags combine)"
run_experiment exp4_optimization "$USAGE" "1 10 100" -- experiment=exp4 :: "$@"
