#!/usr/bin/env bash
# exp 3: 2 particles from the start, full run; compare with exp 2 (paired 2x2 table, McNemar).
source "$(dirname "$0")/_common.sh"
USAGE="usage: $0 --10|--100 [overrides...]   (ImageNet first 10/100 images; flags combine; no --1)"
REFUSE_REASON="one image says nothing about a success rate; use --10 or --100"
run_experiment exp3_2particle "$USAGE" "10 100" -- experiment=exp3 :: "$@"
