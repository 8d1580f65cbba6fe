"""Shape pre-warm: compile a run's graphs before its first measurement, on XLA (``xla_prewarm=true``)
and under ``compile=static|dynamic`` (always: torch.compile builds one graph per batch size for
``static``, whose compile took 37 s per size on an H200; docs/benchmarks.md).

XLA compiles a graph the first time it meets a sequence of operations with given shapes
(docs/tpu.md, "Compilation"); without a pre-warm that happens inside the first measurement, whose
recorded time then includes it. ``prewarm`` runs, on a dummy measurement (a zero image, particle
streams keyed by an image index no dataset has), the sampler's own functions at the shapes a run
meets: ``sampler.daps_step`` once for each kind of annealing step in the plan (repulsion or not,
pruning B -> num_keep, the last step without re-noising), in the plan's order so that the particle
count shrinks as in the run, with the run's hooks and a throw-away ``Telemetry`` (its decodes are
graphs too); the latent optimisation is not run inside those steps (an event may take 500
iterations) but by ``optimize_latents`` itself at every active count from the particles present
at the first optimisation step down to 1 (two iterations each: the first, a later one, the
forward-only end and the read-back). Not covered: a smaller last batch, particles that diverge
(B - k rows), and the small bookkeeping graphs (row selection). Costs: one annealing step per kind
(typically 2-4 of the N steps of one measurement) plus the compilations themselves.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from .particles import Particles
from .sampler import daps_step
from .search.optimizer import optimize_latents
from .telemetry import Telemetry

log = logging.getLogger("treedaps")
DUMMY_IMAGE = 2 ** 31 - 1      # image index of the dummy measurement (keys its particle streams)


def compile_count(kind: str = "xla") -> int | None:
    """Compilations so far in this process: XLA's (``torch_xla.debug.metrics``) or, for any other
    device, the graphs torch.compile built (dynamo's ``unique_graphs``); None if unknown."""
    if kind != "xla":
        try:
            from torch._dynamo.utils import counters  # noqa: PLC0415
        except ImportError:
            return None
        return int(counters["stats"]["unique_graphs"])
    try:
        import torch_xla.debug.metrics as met  # noqa: PLC0415 - TPU only
        data = met.metric_data("CompileTime")
    except (ImportError, AttributeError, RuntimeError):
        return None
    return int(data[0]) if data else 0


def compilations_since(before: int | None, kind: str = "xla") -> int | None:
    """Compilations since ``before`` (an earlier ``compile_count(kind)``); None if either count is
    unknown."""
    now = None if before is None else compile_count(kind)
    return None if now is None else now - before


def prewarm(experiment, measurements: int) -> dict:
    """Run the graphs of a batch of ``measurements`` on a dummy one (module docstring); returns
    the record ``metadata.xla.prewarm``: shapes run, seconds, compilations (None if unknown)."""
    if experiment.baseline is not None:
        log.info("pre-warm: skipped (the %s baseline has its own loop)", experiment.baseline.description)
        return dict(shapes=[], seconds=0.0, measurements=measurements, compilations=None, skipped=True)
    cfg, s, dev, model = experiment.cfg, experiment.settings, experiment.device, experiment.model
    plan, sigmas = experiment.plan.plan, experiment.plan.sigmas
    gt = torch.zeros(measurements, *model.image_shape)
    images = [DUMMY_IMAGE - m for m in range(measurements)]
    particles = Particles.start(s.operator(gt), images, [int(cfg.seed)] * measurements,
                                int(cfg.num_samples), model.latent_shape, s.annealing.sigma_max, dev)
    telemetry = Telemetry(dev, model, s.operator, gt, s.thresholds, bool(cfg.telemetry.diagnostics),
                          bool(cfg.telemetry.pairwise_matrices))
    compiled0, t0 = compile_count(dev.kind), time.perf_counter()
    shapes, seen, opt_rows = [], set(), None
    dev.synchronize()
    try:
        for step in range(plan.num_steps):
            action = plan.at(step)
            if action.optimize and opt_rows is None:
                opt_rows = len(particles)
            kind = (action.prune, action.repulsion > 0, step == plan.num_steps - 1)
            if kind in seen:
                continue
            seen.add(kind)
            before = len(particles)
            telemetry("step_start", dict(step=step, sigma=float(sigmas[step]), phase=action.phase,
                                         particles=particles))
            particles, _ = daps_step(model, s.operator, particles, replace(action, optimize=False),
                                     sigmas[step], sigmas[step + 1], plan.num_steps, s.ode, s.mcmc, dev,
                                     experiment.hooks, telemetry)
            shapes.append(f"step {step} at {before}" + (f"->{len(particles)}" if len(particles) != before else ""))
            if not len(particles):
                break
        if len(particles):                   # the sampler's final decode, kept alive for the sync
            with torch.no_grad():
                images = model.decode(particles.z)
                final = (images, s.operator.loss(images, particles.y))
            dev.synchronize()
            del final
        if opt_rows and len(particles) and s.search.optimization is not None:
            z, y = particles.z.detach(), particles.y
            for n in range(min(opt_rows, len(particles)), 0, -1):
                optimize_latents(z[:n], y[:n], model.decode, s.operator, s.search.optimization, dev,
                                 caps=[2] * n)
                shapes.append(f"optimiser at {n}")
        dev.synchronize()
    finally:
        telemetry.close()
    seconds = time.perf_counter() - t0
    record = dict(shapes=shapes, seconds=seconds, measurements=measurements,
                  compilations=compilations_since(compiled0, dev.kind))
    log.info("pre-warm: %d shapes in %.1f s (%s%s)", len(shapes), seconds, "; ".join(shapes),
             "" if record["compilations"] is None else f"; {record['compilations']} compilations")
    return record
