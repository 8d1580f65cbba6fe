"""Hard data consistency by latent optimisation (ReSample-style), one particle at a time in a batch.

ReSample (Song et al., ICLR 2024; soominkwon/resample ``ldm/models/diffusion/ddim.py``) minimises
the mean-squared error between y and A(decode(z)) with AdamW (lr 5e-3, torch's default weight decay
0.01) for at most 500 iterations, stopping when the loss falls below eps^2 (eps = 1e-3) or when it
is higher than 200 iterations earlier. It runs every 10 of its 500 DDIM steps over the last third,
started from x0hat, plus a final pass on the output. Its loss and its optimiser cover the whole
batch, so one sample's convergence decides when every sample stops. At sigma_y = 0.05 the eps^2 =
1e-6 threshold can never fire on a mean-squared loss (the noise alone leaves ~sigma_y^2 = 2.5e-3
per entry), so in practice it runs to the plateau test or to 500 iterations.

What this module does instead (docs/consistency.md):

* Per-particle independence. Each particle's loss is the MEAN over its own entries of
  (A(decode(z_b)) - y_b)^2; the batch objective is the SUM of those means, so d objective / d z_b
  is exactly particle b's own gradient, whatever the batch. Adam/AdamW are elementwise (their step
  counter is shared, but all active particles step together), so one ``torch.optim.AdamW`` over a
  (B, ...) parameter is B independent optimisers. Each particle has its own loss history and stop
  decision; a particle that stops LEAVES the active set: the parameter is rebuilt from the active
  rows and the optimiser state rows (exp_avg, exp_avg_sq; the step counter) are carried over, so
  the survivors continue exactly as before and the decoder sees a smaller batch.
* Noise-aware stop: a particle stops once its mean-squared residual <= noise_factor * sigma_y^2,
  the expected residual of the true image under the measurement noise (fitting further fits noise).
* The default preset is ``resample``: ReSample's iteration counts, learning rate and stopping rule,
  every refine step from k0, started from z0hat, with each particle stopping on its own. The
  alternatives stay selectable: ``cost_aware`` (a final pass plus at most two events, the first
  optimisation step k0 and the midpoint, under a per-particle iteration budget, with the
  noise-aware stop), ``dense`` and ``weak``. Caveat of the noise-aware stop: on a full-size LDM the
  latent has 12,288 unknowns against 442,368 measurements, so even the truth meets
  mean-residual <= sigma_y^2 only about half the time; the stop then rarely fires and a budget
  split spends most iterations at the first event. Its evidence is from the demo prior only.
  An event a particle cannot afford is skipped and recorded as such (``skipped: true``,
  ``stop_reason: "budget"``), never starved silently.

Loop semantics (per particle, within one event). Evaluation i computes L_i = loss(z_i) (and its
gradient). The stop rules are checked on L_i, in this order: "eps" (L_i < eps^2), "noise"
(noise-aware, L_i <= noise_factor * sigma_y^2), "plateau" (i >= plateau_window and
L_i > L_{i - plateau_window}), cap (i == per-event cap: "max_iters" when the cap is max_iters,
"budget" when the remaining budget set it), "nonfinite" (L_i not finite). A particle that stops
returns z_i, the iterate whose loss triggered the stop (loss_after = L_i exactly, no extra decode;
"nonfinite" returns z_{i-1}); otherwise AdamW steps to z_{i+1}. ``iterations`` counts optimiser
steps, so a particle that stops at evaluation i ran i iterations and i + 1 decoder evaluations
(ReSample's rules on the same L values; it takes one more step after the test fires, we do not).

Cost, in decoder forward+backward passes per particle (k0 = 32 of N = 50, i.e. t = 200;
``max_passes_per_particle``): each event costs at most cap + 1 passes (the +1 is the evaluation
that decides the stop; it is forward-only when every active particle reached its cap).

====================  ======================  =========================================
preset                events (k0=32, N=50)    max iterations per particle
====================  ======================  =========================================
cost_aware            3: 32, 40, 49           600 (budget; 100 kept for the final pass)
dense                 18: 32..49              18 x 500 = 9,000
resample (default)    18: 32..49              18 x 500 = 9,000 (ReSample's literal rules)
weak                  3: 32, 40, 49           3 x 100 = 300 (lr 1e-3)
====================  ======================  =========================================

For scale: LatentDAPS's MCMC costs 50 x 100 = 5,000 Langevin (or 50 x 65 = 3,250 HMC) decoder
forward+backward passes per particle over the whole run.

The optimiser itself (per-particle AdamW, row shrinking, the stop rules) is the pure function
``optimizer.optimize_latents``; this module holds its presets, its schedule and budget, and the
sampler hook. Time is measured by telemetry only (``Telemetry._on_optimize_end``: an event's time
split over its particles by their share of the event's decoder evaluations).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from ..device import Device
from ..models.base import LatentModel
from ..particles import Particles
from .optimizer import STOP_REASONS, ParticleResult, optimize_latents, totals

__all__ = ["PRESETS", "SCHEDULES", "STARTS", "STOP_REASONS", "OptimizationConfig", "ParticleResult",
           "event_cap", "make_optimize_hook", "max_passes_per_particle", "optimization_steps",
           "optimize_latents"]

log = logging.getLogger("treedaps")

SCHEDULES = ("cost_aware", "dense", "final")
STARTS = ("z0y", "z0hat")


@dataclass(frozen=True)
class OptimizationConfig:
    """Latent optimisation settings; the defaults are the ``resample`` preset (ReSample's rules).

    ``lr``, ``max_iters`` (per-event cap), ``eps`` (stop when the mean-squared loss < eps^2),
    ``plateau_window`` (stop when the loss is higher than this many iterations earlier; 0 = off),
    ``weight_decay`` (AdamW's decoupled decay; 0 = off; torch's default 0.01 is what ReSample gets),
    ``noise_aware`` / ``noise_factor`` (stop when the mean-squared loss <= noise_factor * sigma_y^2),
    ``start`` ("z0y": the MCMC sample, or "z0hat": the PF-ODE estimate as ReSample),
    ``schedule`` ("cost_aware" | "dense" | "final"; see ``optimization_steps``),
    ``budget`` (iterations per particle over all events; None = unlimited),
    ``final_reserve`` (iterations of the budget that only the final pass at step N-1 may use, so
    the final pass always runs; 0 = the literal rule: per-event cap = min(max_iters, remaining)).
    """

    lr: float = 5e-3
    max_iters: int = 500
    eps: float = 1e-3
    plateau_window: int = 200
    weight_decay: float = 0.01
    noise_aware: bool = False
    noise_factor: float = 1.0
    start: str = "z0hat"
    schedule: str = "dense"
    budget: int | None = None
    final_reserve: int = 0

    def __post_init__(self):
        schedule = str(self.schedule).replace("-", "_")
        object.__setattr__(self, "schedule", schedule)
        problems = []
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if int(self.max_iters) < 1:
            problems.append(f"max_iters must be >= 1, got {self.max_iters}")
        if self.eps < 0:
            problems.append(f"eps must be >= 0, got {self.eps}")
        if int(self.plateau_window) < 0:
            problems.append(f"plateau_window must be >= 0 (0 = off), got {self.plateau_window}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0 (0 = off), got {self.weight_decay}")
        if self.noise_factor <= 0:
            problems.append(f"noise_factor must be > 0, got {self.noise_factor}")
        if self.start not in STARTS:
            problems.append(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.budget is not None and int(self.budget) < 1:
            problems.append(f"budget must be >= 1 or null (unlimited), got {self.budget}")
        if int(self.final_reserve) < 0 or (self.budget is not None and self.final_reserve >= self.budget):
            problems.append(f"final_reserve must be in [0, budget), got {self.final_reserve}")
        if problems:
            raise ValueError("search.optimization: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, preset: str = "resample", **overrides) -> "OptimizationConfig":
        """The preset's values, then ``overrides`` (unknown keys are an error)."""
        if preset not in PRESETS:
            raise ValueError(f"search.optimization.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown search.optimization key(s) {', '.join(unknown)} "
                             f"(known: preset, {', '.join(sorted(known))})")
        return cls(**{**PRESETS[preset], **overrides})

    @classmethod
    def from_mapping(cls, mapping) -> "OptimizationConfig":
        """From a config block ``{preset: ..., <any field>: ...}`` (e.g. the ``optimization:`` node).

        A key set to None (yaml null) keeps the preset's value; ``budget`` <= 0 means unlimited.
        """
        values = dict(mapping or {})
        preset = str(values.pop("preset", None) or "resample")
        values = {k: v for k, v in values.items() if v is not None}
        if "budget" in values and int(values["budget"]) <= 0:
            values["budget"] = None
        return cls.from_preset(preset, **values)

    def as_dict(self) -> dict:
        return asdict(self)


_RESAMPLE = dict(lr=5e-3, max_iters=500, eps=1e-3, plateau_window=200, weight_decay=0.01)
PRESETS: dict[str, dict] = {
    # ReSample's literal numbers (the default): eps-or-plateau stop only, from z0hat, every refine step.
    "resample": dict(**_RESAMPLE, noise_aware=False, noise_factor=1.0, start="z0hat",
                     schedule="dense", budget=None, final_reserve=0),
    # Cost-aware: k0, the midpoint and the final pass, at most 600 iterations per particle
    # (<= 603 decoder forward+backward passes), stop at the noise level (see the caveat above).
    "cost_aware": dict(**_RESAMPLE, noise_aware=True, noise_factor=1.0, start="z0y",
                    schedule="cost_aware", budget=600, final_reserve=100),
    # ReSample's schedule (every refine step from k0 to N-1: 18 events for k0 = 32, N = 50, up to
    # 9,000 iterations per particle) with our per-particle stop rules.
    "dense": dict(**_RESAMPLE, noise_aware=True, noise_factor=1.0, start="z0y",
                  schedule="dense", budget=None, final_reserve=0),
    # Gentle: strong optimisation can destroy texture; 3 events x 100 iterations at lr 1e-3.
    "weak": dict(lr=1e-3, max_iters=100, eps=1e-3, plateau_window=50, weight_decay=0.01,
                 noise_aware=True, noise_factor=1.0, start="z0y", schedule="cost_aware",
                 budget=300, final_reserve=0),
}


def optimization_steps(cfg: OptimizationConfig, k0: int, num_steps: int) -> list[int]:
    """Annealing steps after whose MCMC the optimisation runs, given the first step k0.

    ``cost_aware``: k0, the midpoint (k0 + N - 1) // 2 and the final step N - 1 (deduplicated);
    ``dense``: every step k0 .. N - 1 (ReSample: every refine step, final pass included);
    ``final``: N - 1 only. The budget does not remove steps here; it is per particle (the hook
    skips a particle whose budget is spent).
    """
    n = int(num_steps)
    if not 0 <= int(k0) <= n - 1:
        raise ValueError(f"first optimisation step must be in [0, {n - 1}], got {k0}")
    last = n - 1
    if cfg.schedule == "dense":
        return list(range(int(k0), n))
    if cfg.schedule == "final":
        return [last]
    return sorted({int(k0), (int(k0) + last) // 2, last})


def event_cap(cfg: OptimizationConfig, used: int, final: bool) -> tuple[int, str]:
    """(iteration cap of one event for a particle that spent ``used``, the reason if it binds)."""
    if cfg.budget is None:
        return int(cfg.max_iters), "max_iters"
    remaining = int(cfg.budget) - int(used) - (0 if final else int(cfg.final_reserve))
    remaining = max(remaining, 0)
    if remaining < cfg.max_iters:
        return remaining, "budget"
    return int(cfg.max_iters), "max_iters"


def max_passes_per_particle(cfg: OptimizationConfig, k0: int, num_steps: int) -> dict:
    """Upper bounds per particle: iterations and decoder evaluations (one per iteration plus
    the deciding evaluation of each event that runs)."""
    steps = optimization_steps(cfg, k0, num_steps)
    used = events = 0
    for s in steps:
        cap, _ = event_cap(cfg, used, final=s == num_steps - 1)
        if cap == 0:            # the particle skips this event: no decoder pass
            continue
        used += cap
        events += 1
    return dict(steps=steps, iterations=used, decoder_evaluations=used + events)


# -- the sampler hook -------------------------------------------------------------------------------
def make_optimize_hook(model: LatentModel, operator: Callable, cfg: OptimizationConfig,
                       device: Device) -> Callable:
    """``SearchHooks.optimize``: hook(particles, z0hat, z0y, step, final_pass) -> (new z0y, record).

    Starts from ``z0y`` or ``z0hat`` (``cfg.start``). Each particle's iterations over all events
    are kept in ``particles.state.opt_iters_used`` (a (B,) long tensor, so ``select`` slices it
    and copies inherit their parent's count). ``final_pass`` (the plan's: step N - 1) is the only
    event allowed into ``cfg.final_reserve``. A particle whose cap is 0 does not run
    (``skipped``) and keeps its MCMC z0y.

    The record is {measurement position: {"particles": [per particle: id, image_index,
    iterations, time_s, loss_before, loss_after, stop_reason, cap, decoder_forward_backward,
    decoder_forward_only, iters_used_total, skipped], "totals": {...}}}; losses are mean-squared
    per measurement entry (operator.loss / #entries), not DAPS's sum.
    """

    def hook(particles: Particles, z0hat: torch.Tensor, z0y: torch.Tensor, step: int, final: bool):
        b = len(particles)
        used_t = particles.state.opt_iters_used
        used = [0] * b if used_t is None else [int(u) for u in used_t.tolist()]
        caps, reasons = zip(*[event_cap(cfg, u, final) for u in used]) if b else ((), ())
        start = z0y if cfg.start == "z0y" else z0hat
        z_new, results = optimize_latents(start, particles.y, model.decode, operator, cfg, device,
                                          ids=particles.ids, caps=list(caps), cap_reasons=list(reasons))
        ran = [r.decoder_forward_backward + r.decoder_forward_only > 0 for r in results]
        starved = [particles.key(p) for p in range(b) if not ran[p] and results[p].stop_reason == "budget"]
        if starved:
            log.warning("latent optimisation at step %d skipped for %d particle(s) (image, id) %s: their "
                        "iteration budget (%s) is spent; recorded as skipped, stop_reason 'budget'",
                        step, len(starved), starved, cfg.budget)
        if not all(ran):                 # particles that did not run keep their MCMC sample
            keep_mcmc = torch.tensor([not x for x in ran], device=z_new.device)
            z_new = torch.where(keep_mcmc.view(-1, *[1] * (z_new.ndim - 1)), z0y.detach(), z_new)
        used_now = [u + r.iterations for u, r in zip(used, results)]
        particles.state.opt_iters_used = torch.tensor(used_now, dtype=torch.long, device=particles.z.device)
        record: dict[int, dict] = {}
        for m, positions in particles.groups().items():
            rows = []
            for pos in positions:
                row = results[pos].as_dict()
                row.update(image_index=particles.image_index[pos], iters_used_total=used_now[pos],
                           skipped=not ran[pos])
                rows.append(row)
            sub = totals([results[p] for p in positions])
            sub.update(start=cfg.start, batch_particles=b, final_pass=bool(final),
                       skipped=sum(not ran[p] for p in positions),
                       budget=cfg.budget, budget_left_min=(None if cfg.budget is None else
                                                           min(cfg.budget - used_now[p] for p in positions)))
            record[m] = {"particles": rows, "totals": sub}
        return z_new.detach(), record

    return hook
