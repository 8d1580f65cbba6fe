"""Paired precision check on the CPU: fp32 vs bf16 through the real path (tiny CompVis LDM).

    python benchmarks/precision_pairs.py [--n 10] [--out /tmp/pairs] [--variant bf16|fast|fast_gn]

Runs exp 0 (4 particles, short schedule) twice on the same n real images (data=demo-ffhq,
data.resolution=64, model=tiny_ldm), once with precision=fp32 and once with precision=bf16 (or,
with ``--variant fast``, the whole fast path: bf16, channels_last, compile=static, cuda_graphs,
which the CPU ignores; ``fast_gn``: the same with nhwc_group_norm), and reports the paired
best-of-4 PSNR difference (variant - fp32: mean, 95% bootstrap interval) and the share of
particles whose mode label is identical. Trajectories are chaotic, so distributions are
compared, not bits. The tiny model has random weights: this checks the machinery, not the real
network's quality (that is benchmarks/speed.py, section accuracy, on the GPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from treedaps.precision import read_flags, restore_flags  # noqa: E402
from treedaps.runner import Experiment  # noqa: E402


VARIANTS = {"fp32": ["precision=fp32"], "bf16": ["precision=bf16"],
            "fast": ["precision=bf16", "channels_last=true", "compile=static", "cuda_graphs=true"]}
VARIANTS["fast_gn"] = [*VARIANTS["fast"], "nhwc_group_norm=true"]


def run_pair(save_dir: Path, n: int = 10, variant: str = "bf16") -> dict:
    from conftest import REAL, compose_cfg  # noqa: PLC0415 - the real-path settings of the test suite
    runs = {}
    flags = read_flags()
    try:
        for mode in ("fp32", variant):
            cfg = compose_cfg(*REAL, f"save_dir={save_dir}", f"name=pairs_{mode}", f"data.end_id={n}",
                              *VARIANTS[mode], "experiment=exp0", "save_grids=false")
            runs[mode] = Experiment(cfg).run()
    finally:
        restore_flags(flags)
    best = {m: torch.tensor(r["psnr"]["best"], dtype=torch.float64) for m, r in runs.items()}
    delta = best[variant] - best["fp32"]
    g = torch.Generator().manual_seed(0)
    boot = torch.stack([delta[torch.randint(0, n, (n,), generator=g)].mean() for _ in range(4000)])
    modes = {m: [c["mode_counts"] for c in r["modes"]["per_unit"]] for m, r in runs.items()}
    same = statistics.fmean(a == b for a, b in zip(modes["fp32"], modes[variant]))
    return dict(n=n, variant=variant, delta_db=delta.tolist(), mean_delta_db=float(delta.mean()),
                ci95=[float(boot.quantile(0.025)), float(boot.quantile(0.975))],
                identical_mode_counts_share=same, best_fp32=best["fp32"].tolist(),
                **{f"best_{variant}": best[variant].tolist()})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--out", default="/tmp/precision_pairs")
    ap.add_argument("--variant", choices=("bf16", "fast", "fast_gn"), default="bf16")
    args = ap.parse_args()
    res = run_pair(Path(args.out), args.n, args.variant)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
