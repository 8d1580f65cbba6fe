#!/usr/bin/env bash
# exp 2: exp 1 + diversity-aware pruning 4 -> 2 at t = 200; compare with exp 1 (paired).
source "$(dirname "$0")/_common.sh"
USAGE="usage: $0 --1|--10|--100 [overrides...]   (ImageNet first 1/10/100 images; flags combine)"
run_experiment exp2_pruning "$USAGE" "1 10 100" -- experiment=exp2 :: "$@"
