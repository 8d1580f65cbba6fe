"""How far apart are "the same" particles in batches of different composition, on a real network?

Runs exp 0 (repulsion 0, Langevin) through the tiny CompVis fixture LDM on one real image twice:
with 4 particles and with 2 particles (ids 0 and 1 in both), and prints, per annealing step, the
largest |z0y difference| of particles 0 and 1 between the two runs, and at the end how many VQ
codes of their final latents differ. On the embedded demo prior the two runs are bitwise equal;
on a real network batch composition changes float rounding (convolution / matmul blocking) and
the VQ nearest-code search amplifies it.

    python benchmarks/pairing_divergence.py [--steps 50] [--mcmc 100] [--image 0]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from treedaps.runner import Experiment  # noqa: E402


def trajectory(num_samples: int, args) -> tuple[list[torch.Tensor], torch.Tensor, Experiment]:
    overrides = ["model=tiny_ldm", "data=demo-ffhq", "data.resolution=64", f"data.start_id={args.image}",
                 f"data.end_id={args.image + 1}", "experiment=exp0", f"num_samples={num_samples}",
                 f"sampler.annealing_scheduler_config.num_steps={args.steps}",
                 f"task.ldm.mcmc_sampler_config.num_steps={args.mcmc}", "progress=false",
                 "eval_fn_list=[psnr]", "save_samples=false", "save_grids=false",
                 f"save_dir={args.out}", f"name=n{num_samples}"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="default", overrides=overrides)
    experiment = Experiment(cfg)
    steps: list[torch.Tensor] = []
    import treedaps.runner as runner  # noqa: PLC0415 - the loop the runner calls, observed

    inner = runner.sample

    def observed(*a, **kw):
        if "callback" in kw:
            kw["callback"] = _spy(kw["callback"], steps)
        else:
            a = (*a[:-1], _spy(a[-1], steps))
        return inner(*a, **kw)

    runner.sample = observed
    try:
        experiment.run()
    finally:
        runner.sample = inner
    final = torch.load(Path(args.out) / f"n{num_samples}" / "units" / f"{args.image:05d}.pt", weights_only=True)
    return steps, final["latents"][:2], experiment


def _spy(callback, steps):
    def spy(event, info):
        if event == "step_end":
            steps.append(info["z0y"][:2].detach().cpu().clone())
        callback(event, info)
    return spy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--mcmc", type=int, default=100)
    ap.add_argument("--image", type=int, default=0)
    ap.add_argument("--out", default="/tmp/pairing_divergence")
    args = ap.parse_args()
    four, final4, exp = trajectory(4, args)
    two, final2, _ = trajectory(2, args)
    diffs = [float((a - b).abs().max()) for a, b in zip(four, two)]
    quantizer = exp.model.first_stage.quantize
    codes4, codes2 = quantizer.codes(final4.to(exp.device.torch_device)), quantizer.codes(final2.to(exp.device.torch_device))
    out = dict(steps=args.steps, mcmc=args.mcmc, image=args.image, max_abs_diff_per_step=diffs,
               first_nonzero_step=next((k for k, d in enumerate(diffs) if d > 0), None),
               codes_differing=int((codes4 != codes2).sum()), codes_total=int(codes4.numel()),
               torch=torch.__version__, threads=torch.get_num_threads())
    for k, d in enumerate(diffs):
        print(f"step {k:2d}  max|dz0y| = {d:.3g}")
    print(json.dumps({k: v for k, v in out.items() if k != "max_abs_diff_per_step"}))


if __name__ == "__main__":
    main()
