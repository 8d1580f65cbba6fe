#!/usr/bin/env bash
# exp 1: 4 particles with repulsion (decaying to 0 at t = 200), full run; compare with exp 0.
source "$(dirname "$0")/_common.sh"
USAGE="usage: $0 --1|--10|--100 [overrides...]   (ImageNet first 1/10/100 images; flags combine)"
run_experiment exp1_repulsion "$USAGE" "1 10 100" -- experiment=exp1 :: "$@"
