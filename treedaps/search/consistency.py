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

Timing rule: after every iteration the device is synchronised and the iteration's wall time is
split EQUALLY among the particles active in that iteration; a particle's ``time_s`` is the sum of
its shares (so the per-particle times add up to the event's iteration time; setup is in
``wall_s`` of the totals only). A stopped particle accrues no more time.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from ..device import Device
from ..models.base import LatentModel
from ..particles import Particles

log = logging.getLogger("treedaps")

STOP_REASONS = ("eps", "noise", "plateau", "max_iters", "budget", "nonfinite")
SCHEDULES = ("cost_aware", "dense", "final")
STARTS = ("z0y", "z0hat")
STATE_KEY = "opt_iters_used"   # particles.state: per-particle iterations spent so far (long, (B,))


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
            raise ValueError("optimization: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, preset: str = "resample", **overrides) -> "OptimizationConfig":
        """The preset's values, then ``overrides`` (unknown keys are an error)."""
        if preset not in PRESETS:
            raise ValueError(f"optimization.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown optimization key(s) {', '.join(unknown)} "
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


# -- the optimisation -------------------------------------------------------------------------------
@dataclass
class ParticleResult:
    """One particle's outcome of one optimisation event (losses are mean-squared per entry)."""

    id: int
    iterations: int = 0                  # optimiser steps taken
    time_s: float = 0.0                  # its share of the iteration wall time (module docstring)
    loss_before: float | None = None     # L_0, at the start
    loss_after: float | None = None      # loss of the returned iterate
    stop_reason: str = ""
    cap: int = 0                         # its per-event iteration cap
    decoder_forward_backward: int = 0    # decoder passes under autograd (each followed by a backward)
    decoder_forward_only: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _clock(device: Device) -> float:
    device.synchronize()
    return time.perf_counter()


def _new_optimizer(param: torch.Tensor, cfg: OptimizationConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW([param], lr=cfg.lr, weight_decay=cfg.weight_decay)


def _shrink(param: torch.Tensor, opt: torch.optim.AdamW, rows: list[int],
            cfg: OptimizationConfig) -> tuple[torch.Tensor, torch.optim.AdamW]:
    """Rebuild the parameter from ``rows`` with their gradient and AdamW state rows."""
    index = torch.tensor(rows, dtype=torch.long, device=param.device)
    new = param.detach().index_select(0, index).clone().requires_grad_(True)
    if param.grad is not None:
        new.grad = param.grad.index_select(0, index).clone()
    new_opt = _new_optimizer(new, cfg)
    old_state = opt.state.get(param, {})
    if old_state:
        new_opt.state[new] = {
            k: (v.index_select(0, index.to(v.device)).clone()
                if torch.is_tensor(v) and v.ndim > 0 and v.shape == param.shape else
                (v.clone() if torch.is_tensor(v) else v))
            for k, v in old_state.items()}
    return new, new_opt


def optimize_latents(z_start: torch.Tensor, y: torch.Tensor, decode: Callable, operator: Callable,
                     cfg: OptimizationConfig, device: Device, ids: list[int] | None = None,
                     caps: list[int] | None = None, cap_reasons: list[str] | None = None,
                     sigma_y: float | None = None) -> tuple[torch.Tensor, list[ParticleResult], dict]:
    """Minimise each particle's mean-squared residual over its latent, independently.

    ``z_start`` (B, ...) latents, ``y`` (B, ...) measurements, ``decode`` latent -> image,
    ``operator(x)`` -> A(x) (its ``sigma`` is sigma_y for the noise-aware stop unless ``sigma_y``
    is given). ``caps[b]`` is particle b's iteration cap (default ``cfg.max_iters``) and
    ``cap_reasons[b]`` what the cap is called ("max_iters" | "budget"); a cap of 0 means the
    particle does not run (returned unchanged, reason ``cap_reasons[b]``, no decoder pass).
    Returns (z at each particle's stopping point (B, ...), per-particle results, totals).
    """
    t_setup = _clock(device)
    b = z_start.shape[0]
    ids = list(range(b)) if ids is None else list(ids)
    caps = [int(cfg.max_iters)] * b if caps is None else [int(c) for c in caps]
    cap_reasons = ["max_iters"] * b if cap_reasons is None else list(cap_reasons)
    sigma = float(getattr(operator, "sigma", 0.0) if sigma_y is None else sigma_y)
    noise_level = cfg.noise_factor * sigma ** 2 if cfg.noise_aware else None
    eps2 = cfg.eps ** 2
    window = int(cfg.plateau_window)

    z_out = z_start.detach().clone()
    results = [ParticleResult(id=i, cap=c) for i, c in zip(ids, caps)]
    finite = torch.isfinite(z_start.detach()).flatten(1).all(1).tolist()
    active: list[int] = []                      # batch positions of the rows of ``param``
    for pos in range(b):
        if not finite[pos]:
            results[pos].stop_reason = "nonfinite"
        elif caps[pos] <= 0:
            results[pos].stop_reason = cap_reasons[pos]
        else:
            active.append(pos)
    history: dict[int, list[float]] = {pos: [] for pos in active}

    iter_time = 0.0
    if active:
        index = torch.tensor(active, dtype=torch.long, device=z_start.device)
        param = z_start.detach().index_select(0, index).clone().requires_grad_(True)
        y_act = y.detach().index_select(0, index.to(y.device))
        opt = _new_optimizer(param, cfg)
        prev = param.detach().clone()
        t_prev = _clock(device)
        i = 0
        with torch.enable_grad():
            while active:
                members = list(active)              # the particles this iteration is charged to
                with_grad = any(i < caps[pos] for pos in active)
                if with_grad:
                    opt.zero_grad(set_to_none=True)
                    loss = (operator(decode(param)) - y_act).pow(2).flatten(1).mean(1)
                    # One backward per decoder pass under autograd, always (telemetry counts so).
                    loss.sum().backward()
                else:                               # every active particle is at its cap
                    with torch.no_grad():
                        loss = (operator(decode(param)) - y_act).pow(2).flatten(1).mean(1)
                values = loss.detach().tolist()
                keep, stopped = [], False
                for row, (pos, value) in enumerate(zip(active, values)):
                    r, hist = results[pos], history[pos]
                    if with_grad:
                        r.decoder_forward_backward += 1
                    else:
                        r.decoder_forward_only += 1
                    if i == 0:
                        r.loss_before = value
                    reason = _stop_reason(value, i, hist, eps2, noise_level, window, caps[pos],
                                          cap_reasons[pos])
                    hist.append(value)
                    if reason is None:
                        keep.append(row)
                        continue
                    stopped = True
                    r.stop_reason, r.iterations = reason, i
                    if reason == "nonfinite" and i > 0:
                        r.loss_after, z_out[pos] = hist[i - 1], prev[row]
                    else:
                        r.loss_after = value if reason != "nonfinite" else None
                        z_out[pos] = param.detach()[row]
                if stopped:
                    active = [active[row] for row in keep]
                    if keep:
                        param, opt = _shrink(param, opt, keep, cfg)
                        y_act = y_act.index_select(0, torch.tensor(keep, dtype=torch.long,
                                                                   device=y_act.device))
                if active:
                    prev = param.detach().clone()
                    opt.step()
                i += 1
                device.iteration_boundary()
                t_now = _clock(device)
                share = (t_now - t_prev) / len(members)
                for pos in members:
                    results[pos].time_s += share
                iter_time += t_now - t_prev
                t_prev = t_now
    totals = _totals(results, wall_s=_clock(device) - t_setup, iter_s=iter_time)
    return z_out, results, totals


def _stop_reason(value: float, i: int, hist: list[float], eps2: float, noise_level: float | None,
                 window: int, cap: int, cap_reason: str) -> str | None:
    """The stop rule of evaluation i (module docstring); ``hist`` holds L_0 .. L_{i-1}."""
    if not math.isfinite(value):
        return "nonfinite"
    if value < eps2:
        return "eps"
    if noise_level is not None and value <= noise_level:
        return "noise"
    if window > 0 and i >= window and value > hist[i - window]:
        return "plateau"
    if i >= cap:
        return cap_reason
    return None


def _totals(results: list[ParticleResult], wall_s: float, iter_s: float) -> dict:
    reasons: dict[str, int] = {}
    for r in results:
        reasons[r.stop_reason] = reasons.get(r.stop_reason, 0) + 1
    return dict(particles=len(results),
                iterations=sum(r.iterations for r in results),
                max_iterations=max((r.iterations for r in results), default=0),
                decoder_forward_backward=sum(r.decoder_forward_backward for r in results),
                decoder_forward_only=sum(r.decoder_forward_only for r in results),
                time_s=sum(r.time_s for r in results), iteration_s=iter_s, wall_s=wall_s,
                stop_reasons=reasons)


# -- the sampler hook -------------------------------------------------------------------------------
def make_optimize_hook(model: LatentModel, operator: Callable, cfg: OptimizationConfig, device: Device,
                       num_steps: int | None = None) -> Callable:
    """``SearchHooks.optimize``: hook(particles, z0hat, z0y, step) -> (new z0y, record).

    Starts from ``z0y`` or ``z0hat`` (``cfg.start``). Each particle's iterations over all events
    are kept in ``particles.state["opt_iters_used"]`` (a (B,) long tensor, so ``select`` slices it
    and copies inherit their parent's count). ``num_steps`` (N) tells which event is the final pass
    (step N - 1), the only one allowed into ``cfg.final_reserve``; without it the reserve is not
    applied (every event: cap = min(max_iters, remaining budget)). A particle whose cap is 0 does
    not run (``skipped``) and keeps its MCMC z0y.

    The record is {measurement position: {"particles": [per particle: id, image_index,
    iterations, time_s, loss_before, loss_after, stop_reason, cap, decoder_forward_backward,
    decoder_forward_only, iters_used_total, skipped], "totals": {...}}}; losses are mean-squared
    per measurement entry (operator.loss / #entries), not DAPS's sum.
    """

    def hook(particles: Particles, z0hat: torch.Tensor, z0y: torch.Tensor, step: int):
        b = len(particles)
        used_t = particles.state.get(STATE_KEY)
        used = [0] * b if used_t is None else [int(u) for u in used_t.tolist()]
        final = num_steps is None or int(step) == int(num_steps) - 1
        caps, reasons = zip(*[event_cap(cfg, u, final) for u in used]) if b else ((), ())
        start = z0y if cfg.start == "z0y" else z0hat
        z_new, results, totals = optimize_latents(start, particles.y, model.decode, operator, cfg,
                                                  device, ids=particles.ids, caps=list(caps),
                                                  cap_reasons=list(reasons))
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
        particles.state[STATE_KEY] = torch.tensor(used_now, dtype=torch.long, device=particles.z.device)
        record: dict[int, dict] = {}
        for m, positions in particles.groups().items():
            rows = []
            for pos in positions:
                row = results[pos].as_dict()
                row.update(image_index=particles.image_index[pos], iters_used_total=used_now[pos],
                           skipped=not ran[pos])
                rows.append(row)
            sub = _totals([results[p] for p in positions], wall_s=totals["wall_s"],
                          iter_s=totals["iteration_s"])
            sub.update(start=cfg.start, batch_particles=b, final_pass=final if num_steps else None,
                       skipped=sum(not ran[p] for p in positions),
                       budget=cfg.budget, budget_left_min=(None if cfg.budget is None else
                                                           min(cfg.budget - used_now[p] for p in positions)))
            record[m] = {"particles": rows, "totals": sub}
        return z_new.detach(), record

    return hook
