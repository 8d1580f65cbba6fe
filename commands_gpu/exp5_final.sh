#!/usr/bin/env bash
# exp 5: the final evaluation. On the chosen images (default --100, ImageNet; --ffhq adds FFHQ):
#   exp 0 (paired baseline) and the best setting (exp 4 preset: repulsion, 4 -> 2 pruning, latent
#   optimisation), then the particle-count sweep N = 1, 2, 8 of the best setting
#   (N = 1: no repulsion, no pruning; N = 2: no pruning; N = 8: 8 -> 4), and the ReSample baseline
#   (4 particles, per-particle optimisation; docs/resample.md) on the same images.
# Compare: python -m treedaps.report results/exp5_* --pair results/exp5_exp0_imagenet_n100 results/exp5_best_imagenet_n100
source "$(dirname "$0")/_common.sh"
USAGE="usage: $0 [--imagenet] [--ffhq] --10|--100 [overrides...]   (first 10/100 images; flags combine)"
REFUSE_REASON="the final table needs at least 10 images; use --10 or --100"
run_experiment exp5_exp0 "$USAGE" "10 100" -- experiment=exp0 :: "$@"
run_experiment exp5_best "$USAGE" "10 100" -- experiment=exp4 :: "$@"
run_experiment exp5_best_N1 "$USAGE" "10 100" -- experiment=exp5_n1 :: "$@"
run_experiment exp5_best_N2 "$USAGE" "10 100" -- experiment=exp5_n2 :: "$@"
run_experiment exp5_best_N8 "$USAGE" "10 100" -- experiment=exp5_n8 :: "$@"
run_experiment exp5_resample "$USAGE" "10 100" -- experiment=resample :: "$@"
