"""Speed of the fast path against DAPS's settings, on one GPU, in one run (docs/benchmarks.md).

    python benchmarks/speed.py --out $OUT              on the GPU machine (see speed.sh)
    python benchmarks/speed.py --smoke --out /tmp/s    on a CPU, tiny model, every section

The network is the full-size FFHQ LDM of configs/model/ffhq256ldm.yaml with random weights (the
compute does not depend on the weight values; ``sections.full_model``, as gpu_check.py uses it). ``daps`` is
exp 0's configuration (precision=daps, eager); ``fast`` is precision=bf16 + channels_last +
compile=static (one graph per batch size; the first call of each size compiles), and ``fast_cg``
the same with cuda_graphs=true. The step section checks fast_cg against fast: the same gradient,
and the same latents after 5 HMC iterations from the same state and noise (bitwise equal on the
CPU and on the H200; only a few iterations, as rounding differences grow along a trajectory). The
later sections use the faster of the two if the check passed (``chosen_fast`` in the JSON).
Sections, in this order (each guarded: a failure is recorded, the rest goes on):

  step        one MCMC step (decode + phase-retrieval loss + backward) at batch 4 in every mode
              (fp32, daps, tf32, bf16, bf16+channels_last, the same with nhwc_group_norm, fast;
              all eager but fast): median of CUDA-event times after warm-up, peak memory
              (allocated / reserved, and above the weights), TFLOP/s from one FlopCounterMode
              count; compile time (first call of fast, forward + backward); the compiled graph at
              batch 2 (after pruning); fast_cg's time (batch 4 and 2) and its check; the speed-up
              is the chosen variant's. Also the fast step with cuDNN's
              autotuning (cudnn.benchmark) and with deterministic=false, which runs do not use by
              default (what reproducibility costs), and with PyTorch's NaN fill of new outputs,
              which runs switch off (``flags``); and fast with nhwc_group_norm (group norms
              that keep the NHWC layout: no conversions at the convolutions; off by default
              until timed), a second copy of the network compiled, with its gradient's relative
              difference from fast's. With ``--nhwc-group-norm`` the fast path has it, and that
              variant runs PyTorch's norm instead (``flags.pytorch_group_norm``)
  image       per image (one measurement, 4 particles, 50 annealing steps): exp 0 (Langevin 100) and
              exp 0b (HMC 65) under daps, exp 2 and exp 4 (same budgets) under fast, exp 4 once
              more with the cost-aware optimisation preset. Each kind of annealing step (explore /
              prune / refine / final) is run twice from the same input state, the first untimed
              (cuDNN autotuning; a compiled model is pre-warmed before, as a run is), and the
              image time is extrapolated over the plan's 50 steps (stated in the JSON). exp 4's
              time splits into optimisation and MCMC steps, with each event's iterations and
              milliseconds per iteration. Last, one optimisation event (2 particles, 100
              iterations) under the optimiser's two read rules: losses read every iteration (the
              default) or every 25 (``cuda_sync_every=25``)
  accuracy    10 measurements (images decoded from random latents; run one at a time, so the
              batch-4 graphs serve), exp 0 with a short schedule, daps vs fast on the same inputs:
              paired best-of-4 PSNR difference (mean, 95% bootstrap interval), share of identical
              mode labels, final measurement losses; target for the real network |mean delta| <=
              0.1 dB and >= 90% identical labels
  throughput  batch_size=auto for fast (the memory probe); images per GPU-hour of exp 0 under daps
              (batch 1) and of exp 4 under fast at the auto batch (its per-image time scaled by the
              MCMC-step time at 4 x batch particles over batch x the time at 4); without an image
              section in this run, ``--image-from`` names an earlier speed.json to take it from
The last lines printed are a table; details go to <out>/speed.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sections import full_model, print_table, run_sections  # noqa: E402 - benchmarks/sections.py
from treedaps.config import validate  # noqa: E402
from treedaps.device import select_device  # noqa: E402
from treedaps.mcmc import MCMCConfig, latent_data_gradient, run_mcmc  # noqa: E402
from treedaps.modes import ModeThresholds, label_modes  # noqa: E402
from treedaps.operators import PhaseRetrieval  # noqa: E402
from treedaps.particles import Particles  # noqa: E402
from treedaps.plan import PhasePlan, build_plan  # noqa: E402
from treedaps.precision import Precision, attention_processors, precision_flags, prepare_model  # noqa: E402
from treedaps.prewarm import compilations_since, compile_count, prewarm  # noqa: E402
from treedaps.sampler import daps_step, sample  # noqa: E402
from treedaps.search import build_search  # noqa: E402
from treedaps.search.consistency import OptimizationConfig, optimize_latents  # noqa: E402
from treedaps.throughput import auto_batch_size, images_per_gpu_hour  # noqa: E402

FAST = Precision("bf16", compile="static", channels_last=True)
FAST_CG = Precision("bf16", compile="static", channels_last=True, cuda_graphs=True)
MODES = {"fp32": Precision("fp32"), "daps": Precision("daps"), "tf32": Precision("tf32"),
         "bf16": Precision("bf16"), "bf16_cl": Precision("bf16", channels_last=True),
         "bf16_cl_gn": Precision("bf16", channels_last=True, nhwc_group_norm=True)}


class Bench:
    """Model pair (eager for the modes, a deep copy wrapped once as ``fast``), inputs, clock."""

    def __init__(self, smoke: bool, compile_: bool, cuda_graphs: bool = False, choose: bool = False,
                 image_from: str | None = None, nhwc_group_norm: bool = False):
        self.smoke = smoke
        self.dev = select_device("cpu" if smoke else "cuda")
        self.model = full_model("ffhq", self.dev, smoke)
        self.choose = choose        # the step section may switch fast to fast_cg (cuda_graph_variant)
        self.image_from = image_from            # --image-from: an earlier run's image times
        fast = (FAST_CG if cuda_graphs else FAST) if compile_ else Precision("bf16", channels_last=True)
        self.fast_precision = dataclasses.replace(fast, nhwc_group_norm=nhwc_group_norm)
        self.fast = prepare_model(copy.deepcopy(self.model), self.fast_precision)
        size = self.model.image_shape[-1]
        self.op = PhaseRetrieval(2.0, size, 0.05)
        self.weights_mb = self.mem_now()

    def mem_now(self):
        return torch.cuda.memory_allocated() / 2 ** 20 if self.dev.kind == "cuda" else None

    def time_ms(self, fn, repeat: int, warmup: int) -> float:
        """Median milliseconds of ``fn`` (CUDA events; perf_counter on the CPU) after ``warmup``."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if self.dev.kind == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)

    def first_call_s(self, fn) -> float:
        """Seconds of the first call of ``fn`` (for a compiled model: tracing and compiling)."""
        t = time.perf_counter()
        fn()
        self.dev.synchronize()
        return time.perf_counter() - t

    def inputs(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(1, *self.model.image_shape, generator=g) * 2 - 1
        y = self.op.measure(x, g).to(self.dev.torch_device)
        z = torch.randn(n, *self.model.latent_shape, generator=g).to(self.dev.torch_device)
        return z, y.expand(n, *y.shape[1:])

    def peak(self, fn) -> dict:
        if self.dev.kind != "cuda":
            return dict(allocated_mb=None, reserved_mb=None, above_weights_mb=None)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        m = self.dev.memory_mb()
        return dict(**m, above_weights_mb=m["allocated_mb"] - base / 2 ** 20)


def step_fn(model, op, z, y):
    grad = latent_data_gradient(model.decode, op.loss, y)
    return lambda: grad(z)


def section_step(b: Bench, res: dict):
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
    z, y = b.inputs(4)
    repeat, warm = (3, 1) if b.smoke else (20, 5)
    with FlopCounterMode(display=False) as counter:
        step_fn(b.model, b.op, z, y)()
    flops = counter.get_total_flops()
    out = dict(batch=4, flops_per_step=flops, attention=attention_processors(b.model), modes={})
    for name, p in MODES.items():
        prepare_model(b.model, p)
        with precision_flags(p.mode):
            fn = step_fn(b.model, b.op, z, y)
            ms = b.time_ms(fn, repeat, warm)
            out["modes"][name] = dict(ms=ms, tflops=flops / ms / 1e9, **b.peak(fn))
    prepare_model(b.model, Precision("daps"))
    with precision_flags(b.fast_precision.mode):
        fn = step_fn(b.fast, b.op, z, y)
        out["compile_s"] = b.first_call_s(fn)
        ms = b.time_ms(fn, repeat, warm)
        out["modes"]["fast"] = dict(ms=ms, tflops=flops / ms / 1e9, precision=b.fast_precision.describe(),
                                    **b.peak(fn))
        out["fast_smaller_batches_ms"] = {n: b.time_ms(step_fn(b.fast, b.op, z[:n], y[:n]), repeat, warm)
                                          for n in (2,)}
        out["flags"] = flag_variants(b, fn, repeat, warm, m_daps=out["modes"]["daps"]["ms"])
        other = "pytorch_group_norm" if b.fast_precision.nhwc_group_norm else "nhwc_group_norm"
        out["flags"][other] = group_norm_variant(b, z, y, fn, repeat, warm, m_daps=out["modes"]["daps"]["ms"])
    if b.choose:
        out["cuda_graphs"] = cuda_graph_variant(b, z, y, flops, out["modes"]["fast"]["ms"], repeat, warm)
    m, flags = out["modes"], out["flags"]
    chosen = out["cuda_graphs"]["ms"] if out.get("cuda_graphs", {}).get("chosen") else m["fast"]["ms"]
    out["speedup_fast_vs_daps"] = m["daps"]["ms"] / chosen
    out["chosen_fast"] = b.fast_precision.describe()
    res["step"] = out
    cg = out.get("cuda_graphs", {})
    return [("MCMC step b=4, ms: " + " / ".join(m), " / ".join(f"{v['ms']:.1f}" for v in m.values())),
            ("cuda_graphs: step ms b=4 / b=2, check grad rel / HMC max|dz|, used",
             f"{cg.get('ms', float('nan')):.1f} / {cg.get('batch2_ms', float('nan')):.1f}, "
             f"{cg.get('check_grad_rel_diff')} / {cg.get('check_max_abs_diff')}, {cg.get('chosen')}"),
            ("TFLOP/s daps / fast", f"{m['daps']['tflops']:.1f} / {m['fast']['tflops']:.1f}"),
            (f"fast with {' / '.join(flags)}: ms (x daps)",
             " / ".join(f"{v['ms']:.1f} ({v['speedup_vs_daps']:.2f}x)" for v in flags.values())),
            (f"{other}: grad rel diff vs fast, compile s",
             f"{flags[other]['grad_rel_diff_vs_fast']:.2e}, {flags[other]['first_call_s']:.1f}"),
            ("step speed-up fastest fast vs daps (target >= 3)", f"{out['speedup_fast_vs_daps']:.2f}x"),
            ("compile (first call, fwd+bwd)", f"{out['compile_s']:.1f} s"),
            ("peak MB above weights daps / fast", f"{m['daps']['above_weights_mb']} / {m['fast']['above_weights_mb']}")]


def flag_variants(b: Bench, fn, repeat: int, warm: int, m_daps: float) -> dict:
    """The fast step (static graphs, no CUDA graphs) under settings that runs do not use by
    default: ``benchmark`` (cudnn.benchmark=True: cuDNN times its algorithms on the first call of
    each shape and keeps the fastest, still among the deterministic ones; the choice may differ
    between runs) and ``nondeterministic`` (deterministic=false: PyTorch's defaults, any
    algorithm), what reproducibility costs; ``nan_fill`` (PyTorch's NaN fill of fresh ATen
    outputs under deterministic algorithms, which treedaps/device.py switches off), what that
    saves. ``first_call_s`` shows a recompile if torch.compile guards on a flag. The flags are put
    back after."""
    from treedaps.device import apply_determinism  # noqa: PLC0415
    out = {}
    for name in ("benchmark", "nondeterministic", "nan_fill"):
        if name == "benchmark":
            torch.backends.cudnn.benchmark = True
        elif name == "nan_fill":
            torch.utils.deterministic.fill_uninitialized_memory = True
        else:
            apply_determinism(False)
        try:
            first = b.first_call_s(fn)
            ms = b.time_ms(fn, repeat, warm)
        finally:
            apply_determinism(True)
        out[name] = dict(ms=ms, first_call_s=first, speedup_vs_daps=m_daps / ms)
    return out


def group_norm_variant(b: Bench, z, y, fast_fn, repeat: int, warm: int, m_daps: float) -> dict:
    """The fast step with the other group norm: ``nhwc_group_norm``
    (treedaps/precision.py:group_norm_in_layout), or PyTorch's if fast has it (``--nhwc-group-norm``),
    on a second copy of the network compiled for it: time, compile time, peak memory, and the
    relative L2 difference of its gradient from the fast step's (both bf16; not bitwise, the
    statistics add in another order)."""
    p = dataclasses.replace(b.fast_precision, nhwc_group_norm=not b.fast_precision.nhwc_group_norm)
    model = prepare_model(copy.deepcopy(b.model), p)
    with precision_flags(p.mode):
        fn = step_fn(model, b.op, z, y)
        first = b.first_call_s(fn)
        ms = b.time_ms(fn, repeat, warm)
        ref, got = fast_fn()[0], fn()[0]
        rel = float((got - ref).norm() / ref.norm())
        return dict(ms=ms, first_call_s=first, speedup_vs_daps=m_daps / ms, grad_rel_diff_vs_fast=rel,
                    precision=p.describe(), **b.peak(fn))


def hmc_end(model, b: Bench, z, y, iters: int = 5):
    """Latents after ``iters`` HMC iterations of exp 0b's sampler from a fixed state and noise."""
    g = torch.Generator(device=b.dev.torch_device).manual_seed(3)
    cfg = MCMCConfig(algo="hmc", num_steps=iters, lr=1e-5, tau=0.01, momentum=0.9)
    zt = z + 0.1 * torch.randn(z.shape, generator=g, device=z.device)
    grad = latent_data_gradient(model.decode, b.op.loss, y)
    out = run_mcmc(z, zt, torch.tensor(0.5, device=z.device), cfg.lr, grad,
                   lambda: torch.randn(z.shape, generator=g, device=z.device), cfg, b.dev)
    return out.z0y


def cuda_graph_variant(b: Bench, z, y, flops: float, fast_ms: float, repeat: int, warm: int) -> dict:
    """fast_cg (fast + cuda_graphs): step time and peak memory; its gradient and 5 HMC iterations
    against fast's from the same state (a replay overwriting a buffer still in use would show); becomes
    ``b.fast`` for the later sections if it is faster than ``fast_ms`` (fast's step) and the check
    passed."""
    p = dataclasses.replace(b.fast_precision, cuda_graphs=True)
    cg = prepare_model(copy.deepcopy(b.model), p)
    with precision_flags(p.mode):
        fn = step_fn(cg, b.op, z, y)
        out = dict(compile_s=b.first_call_s(fn))
        out["ms"] = b.time_ms(fn, repeat, warm)
        out.update(tflops=flops / out["ms"] / 1e9, **b.peak(fn))
        # batch 2 (after pruning), where the launches, not the kernels, bound the compiled step
        out["batch2_ms"] = b.time_ms(step_fn(cg, b.op, z[:2], y[:2]), repeat, warm)
        grads = [latent_data_gradient(m.decode, b.op.loss, y, clamp=None)(z)[0] for m in (b.fast, cg)]
        ref, got = hmc_end(b.fast, b, z, y), hmc_end(cg, b, z, y)
    diff, scale = float((ref - got).abs().max()), float(ref.abs().max())
    gdiff = float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())
    out.update(check_grad_rel_diff=gdiff, check_max_abs_diff=diff, check_ref_max_abs=scale,
               check_ok=bool(gdiff <= 1e-3 and diff <= 1e-3 * scale))
    out["chosen"] = bool(out["check_ok"] and out["ms"] < fast_ms)
    if out["chosen"]:
        b.fast, b.fast_precision = cg, p
    return out


def experiment(name: str, smoke: bool, extra: tuple[str, ...] = ()):
    """Settings and plan of ``experiment=name`` (plus overrides ``extra``) on the FFHQ model config
    (no checkpoint is read)."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415
    over = [f"experiment={name}", "model=ffhq256ldm", "data=test-ffhq", *extra]
    if smoke:
        over += ["sampler.annealing_scheduler_config.num_steps=8", "task.ldm.mcmc_sampler_config.num_steps=3",
                 "task.ldm_hmc.mcmc_sampler_config.num_steps=3", "search.optimization.max_iters=4"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="default", overrides=over)


class OptimizeClock:
    """The sampler's event callback: seconds and totals of each latent-optimisation event."""

    def __init__(self, dev):
        self.dev, self.events, self._t = dev, [], None

    def __call__(self, event: str, info: dict) -> None:
        if event not in ("optimize_start", "optimize_end"):
            return
        self.dev.synchronize()
        now = time.perf_counter()
        if event == "optimize_start":
            self._t = now
            return
        for record in info["record"].values():         # one measurement per image here
            t = record["totals"]
            self.events.append(dict(s=now - self._t, particles=t["particles"], iterations=t["iterations"],
                                    max_iterations=t["max_iterations"], stop_reasons=t["stop_reasons"],
                                    evaluations=t["decoder_forward_backward"] + t["decoder_forward_only"]))

    def summary(self) -> dict | None:
        """The (last) event: its seconds, iterations and milliseconds per optimiser iteration (one
        decoder forward + backward of the particles still running, and the AdamW step)."""
        if not self.events:
            return None
        e = dict(self.events[-1])
        e["ms_per_iteration"] = 1000 * e["s"] / (e["max_iterations"] + 1)   # evaluations 0 .. max
        return e


def time_image(b: Bench, model, name: str, precision: Precision, extra: tuple[str, ...] = ()) -> dict:
    """Per-image seconds of experiment ``name``: each kind of step timed once (after an untimed run
    from the same state), extrapolated over the plan. A compiled model is first pre-warmed as a run
    is (treedaps/prewarm.py): the particles' streams move on between the two runs of a step, so the
    timed one may meet an optimiser active-set size the first did not (on 2026-11-30 exp 4's final
    step took 7.3 s untimed and 49.5 s timed, most likely a compile at a new size). A step with
    latent optimisation also records its event (``optimize``: seconds, iterations, stop reasons, ms
    per iteration), and the per-image total splits into MCMC steps and optimisation."""
    cfg = experiment(name, b.smoke, extra)
    s = dataclasses.replace(validate(cfg), operator=b.op)     # the model's size (the tiny one with --smoke)
    plan = build_plan(s, model)
    hooks = build_search(s.search, model, b.op, s.mcmc.tau, b.dev)
    n = s.annealing.num_steps
    kinds = {}
    for step in range(n):
        a = plan.at(step)
        kind = "prune" if a.prune else "final" if step == n - 1 else "refine" if step > (plan.plan.prune_step or n) \
            else "explore"
        if kind in ("explore", "refine") and a.optimize:
            kind += "_optimize"         # steps with an optimisation event apart (cost_aware has few)
        kinds.setdefault(kind, []).append(step)
    _, y = b.inputs(1, seed=1)
    parts = Particles.start(y[:1], [0], [42], int(cfg.num_samples), model.latent_shape, s.annealing.sigma_max, b.dev)
    measured, warm = {}, None
    with precision_flags(precision.mode):
        if precision.compile != "off":      # every shape the run meets, as a run's pre-warm does
            warm = prewarm(SimpleNamespace(baseline=None, cfg=cfg, settings=s, device=b.dev, model=model,
                                           plan=plan, hooks=hooks), 1)
        for kind, steps in kinds.items():
            step, start = steps[0], parts
            times, compiled = [], []
            for _ in range(2):          # untimed first: compiles this batch size, autotunes cuDNN
                clock = OptimizeClock(b.dev)
                graphs = compile_count(b.dev.kind)
                b.dev.synchronize()
                t = time.perf_counter()
                parts, _ = daps_step(model, b.op, start, plan.at(step), plan.sigmas[step], plan.sigmas[step + 1], n,
                                     s.ode, s.mcmc, b.dev, hooks, clock)
                b.dev.synchronize()
                times.append(time.perf_counter() - t)
                compiled.append(compilations_since(graphs, b.dev.kind))
            # compilations: graphs torch.compile built during the timed run (0 unless a shape was missed)
            measured[kind] = dict(step=step, s=times[1], first_s=times[0], particles_in=len(start),
                                  particles_out=len(parts), optimize=clock.summary(),
                                  compilations=compiled[1], first_compilations=compiled[0])
    total = sum(measured[k]["s"] * len(v) for k, v in kinds.items())
    optimize = sum(m["optimize"]["s"] * len(kinds[k]) for k, m in measured.items() if m["optimize"])
    return dict(per_image_s=total, optimization_s=optimize, mcmc_steps_s=total - optimize, steps=n,
                kinds={k: len(v) for k, v in kinds.items()}, measured=measured, overrides=list(extra),
                precision=precision.mode, compile=precision.compile, prewarm=warm,
                method="each kind of step run twice from the same state, the second timed, x its count")


def optimizer_rules(b: Bench, model, precision: Precision) -> dict:
    """One optimisation event of 2 particles for 100 iterations (no rule stops them: eps 0, no
    plateau) under the host rule (the losses read every iteration, the default) and the device
    rule read every 25 iterations (``cuda_sync_every=25``): ms per iteration (each timed after an
    untimed run) and the largest latent difference between the two (0 when the rows see the same
    operations)."""
    iters = 4 if b.smoke else 100
    cfg = OptimizationConfig.from_preset("resample", eps=0.0, plateau_window=0, max_iters=iters)
    z, y = b.inputs(2, seed=2)
    out, latents = {}, {}
    with precision_flags(precision.mode):
        for name, every in (("host", None), ("device_k25", 25)):
            for _ in range(2):
                b.dev.synchronize()
                t = time.perf_counter()
                latents[name], _ = optimize_latents(z, y, model.decode, b.op, cfg, b.dev, sync_every=every)
                b.dev.synchronize()
            out[name] = dict(ms_per_iteration=1000 * (time.perf_counter() - t) / (iters + 1))
    out["max_abs_diff"] = float((latents["host"] - latents["device_k25"]).abs().max())
    out["iterations"] = iters
    return out


def section_image(b: Bench, res: dict):
    """exp 4 runs twice: with ReSample's optimisation rules (the default preset, the full method)
    and with the cost-aware preset (3 events, a 600-iteration budget per particle). Then the
    optimiser's two read rules on one event (``optimizer_rules``)."""
    out = {"exp0_daps": time_image(b, b.model, "exp0", Precision("daps")),
           "exp0b_daps": time_image(b, b.model, "exp0b", Precision("daps")),
           "exp2_fast": time_image(b, b.fast, "exp2", b.fast_precision),
           "exp4_fast": time_image(b, b.fast, "exp4", b.fast_precision),
           "exp4_fast_cost_aware": time_image(b, b.fast, "exp4", b.fast_precision,
                                              ("search.optimization.preset=cost_aware",))}
    rules = optimizer_rules(b, b.fast, b.fast_precision)
    base = out["exp0_daps"]["per_image_s"]
    for k in ("exp2_fast", "exp4_fast", "exp4_fast_cost_aware"):
        out[k]["fraction_of_exp0"] = out[k]["per_image_s"] / base
    res["image"] = dict(out, optimizer_rules=rules)
    rows = [(f"per image {k} (s)", f"{v['per_image_s']:.1f}" + (f" ({v['fraction_of_exp0']:.2f} of exp 0; target "
             f"<= 0.33)" if "fraction_of_exp0" in v else "")) for k, v in out.items()]
    for k in ("exp4_fast", "exp4_fast_cost_aware"):
        v, events = out[k], [m["optimize"] for m in out[k]["measured"].values() if m["optimize"]]
        rows.append((f"{k}: optimisation s / MCMC steps s; events' iterations, ms per iteration",
                     f"{v['optimization_s']:.1f} / {v['mcmc_steps_s']:.1f}; "
                     + ", ".join(f"{e['max_iterations']} ({e['ms_per_iteration']:.1f})" for e in events)))
    compiled = {k: sum(m["compilations"] or 0 for m in v["measured"].values()) for k, v in out.items()}
    if any(compiled.values()):
        rows.append(("timed runs that compiled graphs (their times include it)",
                     ", ".join(f"{k} {c}" for k, c in compiled.items() if c)))
    rows.append(("optimiser, 2 particles: ms per iteration, losses read every iteration / every 25; max|dz|",
                 f"{rules['host']['ms_per_iteration']:.2f} / {rules['device_k25']['ms_per_iteration']:.2f}; "
                 f"{rules['max_abs_diff']:.3g}"))
    return rows


def section_throughput(b: Bench, res: dict):
    n, probe = auto_batch_size(b.fast, b.op, b.dev, 4, 64, cuda_graphs=b.fast_precision.cuda_graphs)
    z, y = b.inputs(4 * n)
    with precision_flags(b.fast_precision.mode):
        t4 = b.time_ms(step_fn(b.fast, b.op, z[:4], y[:4]), 5, 2)
        tn = b.time_ms(step_fn(b.fast, b.op, z, y), 5, 2)
    image, source = res.get("image") or {}, "this run"
    if not image and b.image_from:
        image, source = json.loads(Path(b.image_from).read_text()).get("image") or {}, b.image_from
    out = dict(auto_batch=n, probe=probe, step_ms_b4=t4, step_ms_auto=tn, scale=tn / (n * t4),
               image_times_from=source if image else None)
    if image:
        out["exp0_daps_per_hour"] = images_per_gpu_hour(1, image["exp0_daps"]["per_image_s"])
        for k in ("exp2", "exp4"):
            out[f"{k}_fast_per_hour"] = images_per_gpu_hour(1, image[f"{k}_fast"]["per_image_s"] * out["scale"])
        out["ratio"] = out["exp4_fast_per_hour"] / out["exp0_daps_per_hour"]
        out["ratio_exp2"] = out["exp2_fast_per_hour"] / out["exp0_daps_per_hour"]
    res["throughput"] = out
    rows = [("batch_size=auto (fast)", f"{n} measurements ({4 * n} particles), step {tn:.1f} ms")]
    if image:
        rows.append(("images / GPU-hour exp0 daps -> exp4 fast (target >= 3x)",
                     f"{out['exp0_daps_per_hour']:.1f} -> {out['exp4_fast_per_hour']:.1f} ({out['ratio']:.2f}x; "
                     f"exp 2 {out['ratio_exp2']:.2f}x; image times from {source})"))
    return rows


def section_accuracy(b: Bench, res: dict):
    from treedaps.metrics import psnr  # noqa: PLC0415
    m = 4 if b.smoke else 10
    steps, mcmc_steps = (3, 3) if b.smoke else (10, 10)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad(), precision_flags("daps"):
        gt = b.model.decode(torch.randn(m, *b.model.latent_shape, generator=g).to(b.dev.torch_device)).clamp(-1, 1)
    y = torch.cat([b.op.measure(gt[i:i + 1].cpu(), torch.Generator().manual_seed(100 + i)) for i in range(m)])
    cfg = experiment("exp0", b.smoke)
    with open_dict(cfg):
        cfg.sampler.annealing_scheduler_config.num_steps = steps
        cfg.task.ldm.mcmc_sampler_config.num_steps = mcmc_steps
    s = validate(cfg)
    outs = {}
    for name, model, p in (("daps", b.model, Precision("daps")), ("fast", b.fast, b.fast_precision)):
        psnrs, losses, modes = [], [], []
        for i in range(m):             # one measurement (4 particles) at a time: the batch-4 graphs
            parts = Particles.start(y[i:i + 1].to(b.dev.torch_device), [i], [42], 4, model.latent_shape,
                                    s.annealing.sigma_max, b.dev)
            with precision_flags(p.mode):
                o = sample(model, b.op, parts, s.annealing.sigmas(), PhasePlan(steps, steps), s.ode, s.mcmc,
                           b.dev)
            images = o.images.float()
            ref = gt[i:i + 1].expand_as(images)
            psnrs.append(psnr(ref, images))
            losses.append(o.loss)
            modes += [lab["mode"] for lab in label_modes(ref, images, ModeThresholds())]
        outs[name] = dict(psnr=torch.stack(psnrs), loss=torch.stack(losses), modes=modes)
    delta = (outs["fast"]["psnr"].max(1).values - outs["daps"]["psnr"].max(1).values).cpu()
    boot = torch.stack([delta[torch.randint(0, m, (m,), generator=g)].mean() for _ in range(2000)])
    same = statistics.fmean(a == c for a, c in zip(outs["fast"]["modes"], outs["daps"]["modes"]))
    out = dict(measurements=m, steps=steps, mcmc_steps=mcmc_steps, delta_psnr=delta.tolist(),
               mean_delta_db=float(delta.mean()), ci95=[float(boot.quantile(0.025)), float(boot.quantile(0.975))],
               identical_mode_share=same, loss_daps=outs["daps"]["loss"].tolist(), loss_fast=outs["fast"]["loss"].tolist(),
               target="|mean delta| <= 0.1 dB and >= 90% identical labels (on the real network)",
               met=abs(float(delta.mean())) <= 0.1 and same >= 0.9)
    res["accuracy"] = out
    return [("accuracy fast vs daps: mean dPSNR [95% CI]", f"{out['mean_delta_db']:+.3f} dB "
             f"[{out['ci95'][0]:+.3f}, {out['ci95'][1]:+.3f}], identical labels {100 * same:.0f}% "
             f"(target met: {out['met']}; random weights)")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="speed_out")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: every section, tiny sizes")
    ap.add_argument("--fast", choices=("auto", "static", "cg", "eager"), default=None,
                    help="the fast path: auto (default on a GPU: static, or cg where the step section "
                         "finds it faster and equal), static, cg (cuda_graphs), eager (bf16 + channels_last, "
                         "no compile; the default with --smoke)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--nhwc-group-norm", action="store_true",
                    help="the fast path with nhwc_group_norm (the step section then times PyTorch's norm "
                         "as the variant)")
    ap.add_argument("--image-from", default=None,
                    help="speed.json of an earlier run whose image section the throughput section uses "
                         "when this run has none (the sections take two device calls)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fast = args.fast or ("eager" if args.smoke else "auto")
    b = Bench(args.smoke, compile_=fast != "eager", cuda_graphs=fast == "cg", choose=fast == "auto",
              image_from=args.image_from, nhwc_group_norm=args.nhwc_group_norm)
    res: dict = {"device": b.dev.describe(), "torch": torch.__version__, "weights_mb": b.weights_mb,
                 "fast": b.fast_precision.describe(), "errors": {}, "section_s": {}}
    rows: list[tuple[str, str]] = [("device", res["device"]["name"])]
    sections = [(name, lambda fn=fn: fn(b, res)) for name, fn in
                (("step", section_step), ("image", section_image), ("accuracy", section_accuracy),
                 ("throughput", section_throughput))]
    rows = run_sections(sections, args.only, res, out / "speed.json", rows)
    print_table(rows, "measure")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
