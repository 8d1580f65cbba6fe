"""Exps 0-4 on the embedded demo prior, paired (same measurements, same particle streams).

    python benchmarks/search_demo.py --out results/search_demo [--n 16] [--scale 0.1]

Runs exp 0 (independent), exp 1 (repulsion), exp 2 (repulsion + 4 -> 2 pruning), exp 3 (2
particles from the start) and exp 4 (exp 2 + latent optimisation) on demo measurements 0..n-1,
prints the report (quality, modes, cost, exp 0 vs 1, exp 1 vs 2, exp 3 vs 2) and returns the
numbers that the slow test (tests/test_search_demo.py) asserts on. On 2 CPU cores: ~1 min per
experiment for n = 16 with the reduced MCMC step count used by the test, ~2 min with the defaults.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from treedaps.report import full_report, load  # noqa: E402
from treedaps.runner import Experiment  # noqa: E402
EXPERIMENTS = ("exp0", "exp1", "exp2", "exp3", "exp4")


def run_all(out: Path, n: int = 16, scale: float | None = None, extra: list[str] = (),
            experiments=EXPERIMENTS) -> dict[str, dict]:
    runs = {}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for exp in experiments:
            overrides = [f"experiment={exp}", f"name={exp}", f"save_dir={out}", "data=demo",
                         "model=toy", f"data.end_id={n}", "progress=false", "eval_fn_list=[psnr,ssim]",
                         "telemetry.pairwise_matrices=false", *extra]
            if scale is not None and exp != "exp0":
                overrides.append(f"repulsion_scale={scale}")
            cfg = compose(config_name="default", overrides=overrides)
            runs[exp] = Experiment(cfg, overrides).run()
    return runs


def key_numbers(out: Path, experiments=EXPERIMENTS) -> dict:
    runs = {e: r for e, r in zip(experiments, load([str(out / e) for e in experiments]))}
    numbers = {}
    for exp, r in runs.items():
        units = r["_units"]
        branch = units[0]["resolved"]["branch_timestep"]["step"]
        explore = [rec["mean_pairwise_z0y"] for u in units for rec in u["trace"] if rec["step"] < branch]
        best_loss = [min(p["loss"] for p in u["particles"] if p["status"] == "final") for u in units]
        numbers[exp] = dict(
            explore_distance=statistics.fmean(explore),
            both_modes=sum(c["both_modes_covered"] for c in r["modes"]["per_unit"]),
            found_truth=sum(c["found_truth"] for c in r["modes"]["per_unit"]),
            best_loss_mean=statistics.fmean(best_loss),
            decoder_evals=r["compute"]["total"]["decoder"]["particle_evals_with_backward"],
            psnr_best=r["psnr"]["summary"]["best_of_n_mean"],
            units=len(units),
        )
    return dict(numbers=numbers, runs=runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/search_demo")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--scale", type=float, default=None, help="repulsion_scale for exps 1-4 (preset's by default)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every experiment")
    args = ap.parse_args()
    out = Path(args.out)
    run_all(out, args.n, args.scale, args.overrides)
    result = key_numbers(out)
    runs = list(result["runs"].values())
    idx = {e: i for i, e in enumerate(result["runs"])}
    print(full_report(runs, [(idx["exp0"], idx["exp1"]), (idx["exp1"], idx["exp2"]), (idx["exp3"], idx["exp2"])]))
    for exp, nums in result["numbers"].items():
        print(exp, nums)


if __name__ == "__main__":
    main()
