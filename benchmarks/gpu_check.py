"""The GPU check of issues #2-#5 in one run: parity, full-size timing and memory, search costs.

    python benchmarks/gpu_check.py --out $OUT            on the GPU machine (see gpu_check.sh)
    python benchmarks/gpu_check.py --smoke --out /tmp/x   on a CPU, tiny sizes: checks the script

Sections (each one guarded: a failure is recorded and the rest goes on):
  parity     tiny fixtures on CUDA (TF32 off) against the CPU references of the public DAPS code
  ffhq/imagenet  full-size networks, random weights (compute does not depend on weight values),
             batch 4, 256 x 256: one MCMC data-gradient step (decode + phase-retrieval loss +
             backward), one denoiser call, 3 annealing steps with exp 0 (Langevin 100) and exp 0b
             (HMC 65) settings, peak memory; with PyTorch's default TF32 settings
  determinism  FFHQ full size, exp 1's settings for a few steps, twice under deterministic=true
             (bitwise equal?), and its time cost against PyTorch's defaults
  pruning    FFHQ full size, a short schedule with 4 -> 2 pruning: per-step time and peak memory
             before and after the pruning, and the same schedule without pruning (ratio)
  optimize   FFHQ full size: time per latent-optimisation iteration, the iterations that
             ReSample's stopping rule actually runs at sigma_y = 0.05, optimisation peak memory
  resample   the ReSample baseline at 4 particles on full-size FFHQ (random weights): 10 DDIM steps
             with capped events; time per DDIM+DPS step, per pixel / latent iteration, peak memory,
             and the upper bound of a full 500-step run from them (docs/resample.md)
  demo       the embedded demo end to end on CUDA
  tests      the test suite with CUDA visible
The last lines printed are a table; details go to <out>/gpu_check.json.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sections import SHARED, full_model, print_table, run_sections  # noqa: E402 - benchmarks/sections.py
from treedaps.device import apply_determinism, select_device  # noqa: E402
from treedaps.mcmc import MCMCConfig, latent_data_gradient  # noqa: E402
from treedaps.models.ldm import build_ldm  # noqa: E402
from treedaps.operators import PhaseRetrieval  # noqa: E402
from treedaps.particles import Particles  # noqa: E402
from treedaps.plan import PhasePlan, decay_weights  # noqa: E402
from treedaps.sampler import daps_step, sample  # noqa: E402
from treedaps.schedules import AnnealingConfig, ODEConfig, annealing_sigmas  # noqa: E402
from treedaps.search import SearchHooks  # noqa: E402
from treedaps.search.pruning import PruningConfig, make_prune_hook  # noqa: E402
from treedaps.search.repulsion import make_repulsion  # noqa: E402
from treedaps.telemetry import fingerprints  # noqa: E402
from treedaps.telemetry import Telemetry  # noqa: E402

LANGEVIN = MCMCConfig("langevin", 100, 3.5e-5, 0.01, 0.12)
HMC = MCMCConfig("hmc", 65, 2.1e-5, 0.01, 0.12, 0.41)


def sync(dev):
    dev.synchronize()


def timed(fn, dev, repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_mb(dev):
    m = dev.memory_mb()
    return None if m is None else round(m["allocated_mb"], 1)


def section_parity(dev, results):
    """Tiny fixtures on the device, TF32 off, against the CPU references."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for name in ("ffhq", "imagenet"):
        cfg = OmegaConf.load(SHARED / f"tiny_{name}_ldm.yaml")
        cfg.diffusion_path = str(SHARED / f"tiny_{name}_ldm.ckpt")
        model = build_ldm(cfg, dev.torch_device)
        ref = torch.load(SHARED / f"refs_tiny_{name}.pt", weights_only=True)
        z, sig = ref["z"].to(dev.torch_device), ref["sigmas"].to(dev.torch_device)

        def rel(a, b):
            return float((a.float().cpu() - b).abs().max() / b.abs().max())

        with torch.no_grad():
            out[f"{name}.decode"] = rel(model.decode(z), ref["decode"])
            out[f"{name}.denoiser_sigma_vec"] = rel(model.denoise(z, sig), ref["denoiser_sigma_vec"])
            out[f"{name}.encode"] = rel(model.encode(ref["x"].to(dev.torch_device)), ref["encode"])
            out[f"{name}.vq_indices_equal"] = bool(torch.equal(model.quantize(z)[1].cpu(), ref["vq_indices"]))
        zz = z.clone().requires_grad_(True)
        grad = torch.autograd.grad(model.decode(zz).pow(2).sum(), zz)[0]
        out[f"{name}.grad_decode_sq"] = rel(grad, ref["grad_decode_sq"])
    torch.backends.cudnn.allow_tf32 = True  # back to PyTorch's defaults for the timings
    results["parity"] = out
    worst = max(v for k, v in out.items() if not k.endswith("equal"))
    return [("parity (TF32 off)", f"max rel diff {worst:.2e} (tol 1e-4), vq codes equal: "
             f"{all(v for k, v in out.items() if k.endswith('equal'))}")]


def annealing_steps(model, op, y, dev, mcmc: MCMCConfig, n_steps: int, batch: int):
    """``n_steps`` LatentDAPS steps through the sampler's own ``daps_step``; per-step seconds, peak MB."""
    sigmas = annealing_sigmas(50, 10.0, 0.1)
    plan = PhasePlan(50, 50)
    parts = Particles.start(y, [0], [42], batch, model.latent_shape, 10.0, dev)
    per_step = []
    dev.reset_peak()
    for step in range(n_steps):
        sync(dev)
        t = time.perf_counter()
        parts, _ = daps_step(model, op, parts, plan.at(step), sigmas[step], sigmas[step + 1], 50, ODEConfig(),
                             mcmc, dev, SearchHooks(), lambda event, info: None)
        sync(dev)
        per_step.append(time.perf_counter() - t)
    return per_step, peak_mb(dev)


def section_full(name: str, dev, results, smoke: bool):
    model = full_model(name, dev, smoke)
    weights = dev.current_allocated_mb()
    size = model.image_shape[-1]
    op = PhaseRetrieval(2.0, 256, 0.05)
    x = torch.rand(1, *model.image_shape) * 2 - 1
    y = op.measure(x, torch.Generator().manual_seed(0))
    b = 4
    z = torch.randn(b, *model.latent_shape, device=dev.torch_device)
    grad = latent_data_gradient(model.decode, op.loss, y.to(dev.torch_device).expand(b, *y.shape[1:]))
    dev.reset_peak()
    t_grad = timed(lambda: grad(z), dev, 3 if smoke else 10)
    peak_grad = peak_mb(dev)
    sigma = torch.tensor(2.0)
    with torch.no_grad():
        t_den = timed(lambda: model.denoise(z, sigma), dev, 3 if smoke else 10)
    n = 1 if smoke else 3
    lang = [LANGEVIN, MCMCConfig("langevin", 3, 3.5e-5)][smoke]
    hmc = [HMC, MCMCConfig("hmc", 3, 2.1e-5, momentum=0.41)][smoke]
    steps_l, peak_l = annealing_steps(model, op, y, dev, lang, n, b)
    steps_h, peak_h = annealing_steps(model, op, y, dev, hmc, n, b)
    results[name] = dict(image_size=size, batch=b, weights_mb=weights, data_grad_ms=1000 * t_grad,
                         data_grad_peak_mb=peak_grad, denoiser_ms=1000 * t_den,
                         langevin_step_s=steps_l, langevin_peak_mb=peak_l, hmc_step_s=steps_h, hmc_peak_mb=peak_h)
    del model
    torch.cuda.empty_cache() if dev.kind == "cuda" else None
    return [(f"{name} data-gradient step (b=4)", f"{1000 * t_grad:.1f} ms, peak {peak_grad} MB"),
            (f"{name} denoiser call (b=4)", f"{1000 * t_den:.1f} ms"),
            (f"{name} annealing step, Langevin {lang.num_steps}", f"{statistics.fmean(steps_l):.2f} s, peak {peak_l} MB"),
            (f"{name} annealing step, HMC {hmc.num_steps}", f"{statistics.fmean(steps_h):.2f} s, peak {peak_h} MB")]


def run_schedule(model, op, y, dev, mcmc, plan, hooks, n_particles):
    parts = Particles.start(y, [0], [42], n_particles, model.latent_shape, 10.0, dev)
    tel = Telemetry(dev, model, op, None, diagnostics=False, record_matrices=False)
    sync(dev)
    t = time.perf_counter()
    sample(model, op, parts, AnnealingConfig(plan.num_steps, 10.0, 0.1).sigmas(), plan, ODEConfig(), mcmc, dev,
           hooks, tel)
    sync(dev)
    total = time.perf_counter() - t
    batches = list(tel.counters["decoder"].batch_sizes)
    tel.close()
    return total, tel.steps, tel.compute_counts(), batches


def exp1_schedule(model, op, y, dev, mcmc, n: int) -> tuple[float, list[str]]:
    """exp 1's settings (4 particles, repulsion 0.1 decaying to 0 at step n - 2) for ``n`` steps:
    (seconds, fingerprints of the final latents)."""
    plan = PhasePlan(n, n - 2, repulsion=decay_weights(0.1, n - 2, n, "linear"))
    hooks = SearchHooks(repulsion=make_repulsion(mcmc.tau))
    parts = Particles.start(y, [0], [42], 4, model.latent_shape, 10.0, dev)
    sync(dev)
    t = time.perf_counter()
    out = sample(model, op, parts, AnnealingConfig(n, 10.0, 0.1).sigmas(), plan, ODEConfig(), mcmc, dev, hooks, None)
    sync(dev)
    return time.perf_counter() - t, fingerprints(out.particles.z)


def section_determinism(dev, results, smoke: bool):
    """The same exp 1 schedule twice under deterministic=true (must be bitwise equal), then the time
    cost of deterministic=true against PyTorch's defaults (deterministic=false), full-size FFHQ."""
    model = full_model("ffhq", dev, smoke)
    op = PhaseRetrieval(2.0, 256, 0.05)
    y = op.measure(torch.rand(1, *model.image_shape) * 2 - 1, torch.Generator().manual_seed(0))
    mcmc = MCMCConfig("langevin", 3 if smoke else 20, 3.5e-5)
    n = 4 if smoke else 6
    try:
        apply_determinism(True)
        t_a, fp_a = exp1_schedule(model, op, y, dev, mcmc, n)
        t_b, fp_b = exp1_schedule(model, op, y, dev, mcmc, n)
        apply_determinism(False)
        t_c, fp_c = exp1_schedule(model, op, y, dev, mcmc, n)
        t_d, _ = exp1_schedule(model, op, y, dev, mcmc, n)
    finally:
        apply_determinism(True)
    res = dict(steps=n, mcmc_steps=mcmc.num_steps, deterministic_s=[t_a, t_b], default_s=[t_c, t_d],
               identical_twice=fp_a == fp_b, identical_to_default_flags=fp_a == fp_c)
    results["determinism"] = res
    ratio = min(t_a, t_b) / min(t_c, t_d)
    return [("exp 1 twice, deterministic=true", "bitwise identical" if fp_a == fp_b else "DIFFERENT"),
            ("time deterministic=true / false", f"{ratio:.3f} ({min(t_a, t_b):.1f} s vs {min(t_c, t_d):.1f} s, "
                                                f"{n} steps x Langevin {mcmc.num_steps}, 4 particles)")]


def section_pruning(dev, results, smoke: bool):
    model = full_model("ffhq", dev, smoke)
    op = PhaseRetrieval(2.0, 256, 0.05)
    y = op.measure(torch.rand(1, *model.image_shape) * 2 - 1, torch.Generator().manual_seed(0))
    mcmc = MCMCConfig("langevin", 3 if smoke else 20, 3.5e-5)
    n = 6
    prune_at = 3
    hooks = SearchHooks(prune=make_prune_hook(model, op, PruningConfig(num_keep=2), dev))
    total_p, steps_p, counts_p, batches_p = run_schedule(model, op, y, dev, mcmc, PhasePlan(n, n, prune_at), hooks, 4)
    total_0, steps_0, counts_0, _ = run_schedule(model, op, y, dev, mcmc, PhasePlan(n, n), SearchHooks(), 4)
    before = [s for s in steps_p if s["step"] < prune_at]
    after = [s for s in steps_p if s["step"] > prune_at]
    res = dict(steps=n, mcmc_steps=mcmc.num_steps, prune_at=prune_at,
               step_s_before=statistics.fmean(s["time_s"] for s in before),
               step_s_after=statistics.fmean(s["time_s"] for s in after),
               peak_mb_before=max((s["peak_mb"] or 0) for s in before) or None,
               peak_mb_after=max((s["peak_mb"] or 0) for s in after) or None,
               decoder_batch_sizes_seen=sorted(set(batches_p)),
               total_s_pruned=total_p, total_s_unpruned=total_0, ratio=total_p / total_0,
               decoder_evals_pruned=counts_p["decoder"]["particle_evals"],
               decoder_evals_unpruned=counts_0["decoder"]["particle_evals"])
    results["pruning"] = res
    return [("pruning 4->2: step time before / after", f"{res['step_s_before']:.2f} s / {res['step_s_after']:.2f} s"),
            ("pruning 4->2: peak MB before / after", f"{res['peak_mb_before']} / {res['peak_mb_after']}"),
            ("pruned vs unpruned schedule (same card)", f"{res['ratio']:.3f} x time, decoder evals "
             f"{res['decoder_evals_pruned']:.0f} vs {res['decoder_evals_unpruned']:.0f}")]


def section_optimize(dev, results, smoke: bool):
    try:
        from treedaps.search.consistency import OptimizationConfig, optimize_latents  # noqa: PLC0415
    except ImportError as err:
        results["optimize"] = dict(skipped=str(err))
        return [("latent optimisation", f"skipped: {err}")]
    model = full_model("ffhq", dev, smoke)
    op = PhaseRetrieval(2.0, 256, 0.05)
    b = 8
    x = torch.rand(1, *model.image_shape) * 2 - 1
    y = op.measure(x, torch.Generator().manual_seed(0)).to(dev.torch_device).expand(b, -1, -1, -1)
    with torch.no_grad():
        z = model.encode(x.to(dev.torch_device)).expand(b, -1, -1, -1).contiguous()
    z = z + 0.3 * torch.randn(z.shape, generator=torch.Generator(dev.torch_device).manual_seed(1),
                              device=dev.torch_device) * torch.linspace(0.2, 2, b, device=dev.torch_device).view(-1, 1, 1, 1)
    # ReSample's literal stopping rule (no noise-aware stop), as the issue asks for the histogram.
    cfg = OptimizationConfig.from_preset("resample", max_iters=20 if smoke else 500)
    dev.reset_peak()
    sync(dev)
    t = time.perf_counter()
    _, per = optimize_latents(z, y, model.decode, op, cfg, dev, sigma_y=op.sigma)
    sync(dev)
    total = time.perf_counter() - t
    iters = [p.iterations for p in per]
    res = dict(batch=b, total_s=total, iterations=iters, stop_reasons=[p.stop_reason for p in per],
               loss_before=[p.loss_before for p in per], loss_after=[p.loss_after for p in per],
               time_per_iteration_ms=1000 * total / max(1, max(iters)), peak_mb=peak_mb(dev))
    results["optimize"] = res
    return [("latent optimisation (b=8)", f"{res['time_per_iteration_ms']:.1f} ms / iteration (batch), "
             f"peak {res['peak_mb']} MB"),
            ("ReSample rule: iterations run (b=8)", f"{sorted(iters)} ({', '.join(sorted(set(res['stop_reasons'])))})")]


def section_resample(dev, results, smoke: bool):
    from treedaps.baselines.resample import ResampleConfig, resample  # noqa: PLC0415

    model = full_model("ffhq", dev, smoke, mapping="checkpoint")
    op = PhaseRetrieval(2.0, model.image_shape[-1], 0.05)
    x = torch.rand(1, *model.image_shape) * 2 - 1
    y = op.measure(x, torch.Generator().manual_seed(0))
    parts = Particles.start(y, [0], [42], 4, model.latent_shape, 1.0, dev)
    tel = Telemetry(dev, model, op, None, diagnostics=False, record_matrices=False)
    cap = 3 if smoke else 20               # pixel at steps 3, 5; latent at 7; final at 9
    cfg = ResampleConfig(num_steps=10, interval=2, pixel_max_iters=cap, latent_max_iters=cap, plateau_window=0)
    dev.reset_peak()
    resample(model, op, parts, cfg, dev, tel)
    tel.close()
    plain = [s["time_s"] for s in tel.steps if not s["optimize_s"]]
    events = {e["step"]: e["record"][0]["totals"] for e in tel.events}

    def per_event(kind):                   # (s per iteration of the batch, s of the event's other work)
        ev = [(t["time_s"] / max(1, t["max_iterations"]), tel.steps[s]["optimize_s"] - t["time_s"])
              for s, t in events.items() if t["kind"] == kind]
        return tuple(statistics.fmean(v) for v in zip(*ev))

    (pix, pix_o), (lat, lat_o), (fin, fin_o) = per_event("pixel"), per_event("latent"), per_event("final")
    full = (500 * statistics.fmean(plain) + 17 * (pix_o + 2000 * pix) + 16 * (lat_o + 500 * lat)
            + fin_o + 500 * fin)
    res = dict(particles=4, ddim_step_s=statistics.fmean(plain), pixel_iteration_s=pix, latent_iteration_s=lat,
               pixel_event_overhead_s=pix_o, latent_event_overhead_s=lat_o,
               peak_mb=max(s["peak_mb"] or 0 for s in tel.steps),
               full_run_upper_bound_s=full, compute=tel.compute_counts())
    results["resample"] = res
    return [("ReSample DDIM+DPS step (4 particles)", f"{res['ddim_step_s']:.3f} s, peak {res['peak_mb']} MB"),
            ("ReSample iteration pixel / latent (4)", f"{1000 * pix:.2f} / {1000 * lat:.1f} ms"),
            ("ReSample 500 steps, caps (upper bound)", f"{full:.0f} s per image at 4 particles")]


def section_demo(dev, results, smoke: bool, out: Path):
    cmd = [sys.executable, str(ROOT / "posterior_sample.py"), f"device={'cpu' if smoke else 'cuda'}",
           f"save_dir={out / 'runs'}", "name=demo_device", "data.end_id=2", "progress=false",
           "eval_fn_list=[psnr,ssim]"]
    if smoke:
        cmd += ["sampler.annealing_scheduler_config.num_steps=3", "task.ldm.mcmc_sampler_config.num_steps=3"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    results["demo"] = dict(returncode=proc.returncode, seconds=time.perf_counter() - t,
                           tail=(proc.stdout + proc.stderr)[-2000:])
    return [("demo on the device (2 measurements)", f"rc {proc.returncode}, {time.perf_counter() - t:.0f} s")]


def section_tests(dev, results, smoke: bool):
    """The test suite with CUDA visible (runs on device=auto pick the GPU)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    results["tests"] = dict(returncode=proc.returncode, seconds=time.perf_counter() - t, tail=tail[-30:])
    return [("test suite (CUDA visible)", f"rc {proc.returncode}: {tail[-1] if tail else ''}")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models: check the script itself")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = select_device("cpu" if args.smoke else "cuda")
    results: dict = {"device": dev.describe(), "torch": torch.__version__, "errors": {}}
    rows: list[tuple[str, str]] = [("device", results["device"]["name"])]
    sections = [("parity", lambda: section_parity(dev, results)),
                ("ffhq", lambda: section_full("ffhq", dev, results, args.smoke)),
                ("imagenet", lambda: section_full("imagenet", dev, results, args.smoke)),
                ("determinism", lambda: section_determinism(dev, results, args.smoke)),
                ("pruning", lambda: section_pruning(dev, results, args.smoke)),
                ("optimize", lambda: section_optimize(dev, results, args.smoke)),
                ("resample", lambda: section_resample(dev, results, args.smoke)),
                ("demo", lambda: section_demo(dev, results, args.smoke, out)),
                ("tests", lambda: section_tests(dev, results, args.smoke))]
    rows = run_sections(sections, args.only, results, out / "gpu_check.json", rows)
    print_table(rows, "check")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
