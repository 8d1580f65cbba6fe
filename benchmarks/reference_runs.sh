#!/usr/bin/env bash
# The reference runs of a behaviour-preserving change (docs/benchmarks.md, "Refactor check"): the
# demo, exp 1 / 2 / 4 on the demo and exp 1 / 2 / 4 / 5 (N = 8) / ReSample through the tiny CompVis
# LDM, into OUT. Run it with the code before and after the change, then compare each run:
#   bash benchmarks/reference_runs.sh /tmp/before        # (at the old commit)
#   bash benchmarks/reference_runs.sh /tmp/after
#   for r in /tmp/before/*/; do python benchmarks/compare_runs.py "$r" "/tmp/after/$(basename "$r")"; done
# About 10 minutes on 2 CPU cores. Needs ../shared (the tiny checkpoint and demo-ffhq images).
set -euo pipefail
OUT="${1:?usage: reference_runs.sh OUT_DIR}"
cd "$(dirname "$0")/.."
SHARED="$(cd .. && pwd)/shared"
export OMP_NUM_THREADS=1 TREEDAPS_TINY_LDM="$SHARED/fixtures/daps_ref/tiny_ffhq_ldm.ckpt" \
  TREEDAPS_DEMO_FFHQ_DIR="$SHARED/data/demo-ffhq"
O=search.optimization
FEW="sampler.annealing_scheduler_config.num_steps=10 task.ldm.mcmc_sampler_config.num_steps=10 progress=false"
REAL="model=tiny_ldm data=demo-ffhq data.resolution=64 sampler.annealing_scheduler_config.num_steps=8
  task.ldm.mcmc_sampler_config.num_steps=3 $O.max_iters=4 $O.plateau_window=2 resample.num_steps=10
  resample.interval=2 resample.latent_max_iters=4 resample.pixel_max_iters=4 resample.plateau_window=2
  telemetry.prior_score=false eval_fn_list=[psnr,ssim] progress=false save_samples=false data.end_id=1"
python posterior_sample.py save_dir="$OUT" name=d data.end_id=3 progress=false
python posterior_sample.py save_dir="$OUT" name=exp2 experiment=exp2 data.end_id=3 $FEW
python posterior_sample.py save_dir="$OUT" name=exp4 experiment=exp4 data.end_id=3 $FEW $O.max_iters=20
python posterior_sample.py save_dir="$OUT" name=exp1 experiment=exp1 data.end_id=3 $FEW
for e in exp1 exp2 exp4 exp5_n8 resample; do
  python posterior_sample.py save_dir="$OUT" name="real_$e" experiment="$e" $REAL
done
