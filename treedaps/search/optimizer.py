"""The latent optimiser as a pure function: per-particle AdamW with row shrinking and stop rules.

``optimize_latents`` minimises each particle's mean-squared residual ||A(decode(z_b)) - y_b||^2 /
#entries over its own latent (docs/consistency.md; the loop semantics and stop rules are in
``treedaps.search.consistency``'s docstring). One ``torch.optim.AdamW`` over a (B, ...) parameter
is B independent optimisers (Adam is elementwise and the batch objective is the SUM of the
per-particle means); a particle that stops leaves the active set: the parameter and AdamW's state
rows are rebuilt from the remaining rows (``_shrink``), so the others continue exactly as before
and the decoder sees a smaller batch. That loop reads every active loss back each iteration (a
device sync); on XLA, and on CUDA with ``cuda_sync_every``, the same rules run on the device
(``optimizer_masked``: stopped rows frozen, read back every K iterations). It returns per
particle: iterations, stop reason, loss before / after, cap, decoder evaluations. It reads no
clock and never waits for the device (time is telemetry's: ``Telemetry._on_optimize_end``);
``on_iteration`` lets an observer follow it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..device import Device

if TYPE_CHECKING:
    from .consistency import OptimizationConfig

STOP_REASONS = ("eps", "noise", "plateau", "max_iters", "budget", "nonfinite")


@dataclass
class ParticleResult:
    """One particle's outcome of one optimisation event (losses are mean-squared per entry)."""

    id: int
    iterations: int = 0                  # optimiser steps taken
    time_s: float = 0.0                  # its share of the event's time (set by telemetry, not here)
    loss_before: float | None = None     # L_0, at the start
    loss_after: float | None = None      # loss of the returned iterate
    stop_reason: str = ""
    cap: int = 0                         # its per-event iteration cap
    decoder_forward_backward: int = 0    # decoder passes under autograd (each followed by a backward)
    decoder_forward_only: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


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


@dataclass
class Setup:
    """What both loops share: per-particle settings, the outputs, and the rows that run."""

    caps: list[int]
    cap_reasons: list[str]
    noise_level: float | None     # the noise-aware threshold (None: off)
    eps2: float
    window: int
    z_out: torch.Tensor
    results: list[ParticleResult]
    active: list[int]             # batch positions that run (finite start, cap > 0)

    @classmethod
    def build(cls, z_start, operator, cfg, ids, caps, cap_reasons, sigma_y) -> "Setup":
        b = z_start.shape[0]
        ids = list(range(b)) if ids is None else list(ids)
        caps = [int(cfg.max_iters)] * b if caps is None else [int(c) for c in caps]
        cap_reasons = ["max_iters"] * b if cap_reasons is None else list(cap_reasons)
        sigma = float(getattr(operator, "sigma", 0.0) if sigma_y is None else sigma_y)
        results = [ParticleResult(id=i, cap=c) for i, c in zip(ids, caps)]
        finite = torch.isfinite(z_start.detach()).flatten(1).all(1).tolist()
        active = []
        for pos in range(b):
            if not finite[pos]:
                results[pos].stop_reason = "nonfinite"
            elif caps[pos] <= 0:
                results[pos].stop_reason = cap_reasons[pos]
            else:
                active.append(pos)
        return cls(caps, cap_reasons, cfg.noise_factor * sigma ** 2 if cfg.noise_aware else None,
                   cfg.eps ** 2, int(cfg.plateau_window), z_start.detach().clone(), results, active)

    def start_rows(self, z_start, y, cfg) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.optim.AdamW]:
        """(batch positions of the rows, the parameter, their measurements, its AdamW) to start from."""
        rows = list(self.active)
        index = torch.tensor(rows, dtype=torch.long, device=z_start.device)
        param = z_start.detach().index_select(0, index).clone().requires_grad_(True)
        return rows, param, y.detach().index_select(0, index.to(y.device)), _new_optimizer(param, cfg)

    def charge(self, rows: list[int], with_grad: bool) -> None:
        """One decoder pass to each particle of ``rows`` (forward+backward or forward only)."""
        for pos in rows:
            if with_grad:
                self.results[pos].decoder_forward_backward += 1
            else:
                self.results[pos].decoder_forward_only += 1


def row_losses(param: torch.Tensor, y: torch.Tensor, decode: Callable, operator: Callable) -> torch.Tensor:
    """Per-row objective mean |A(D(z)) - y|^2 of the optimiser, shape (rows,)."""
    return (operator(decode(param)) - y).pow(2).flatten(1).mean(1)


def optimize_latents(z_start: torch.Tensor, y: torch.Tensor, decode: Callable, operator: Callable,
                     cfg: OptimizationConfig, device: Device, ids: list[int] | None = None,
                     caps: list[int] | None = None, cap_reasons: list[str] | None = None,
                     sigma_y: float | None = None,
                     on_iteration: Callable[[dict], None] | None = None,
                     sync_every: int | None = None) -> tuple[torch.Tensor, list[ParticleResult]]:
    """Minimise each particle's mean-squared residual over its latent, independently.

    ``z_start`` (B, ...) latents, ``y`` (B, ...) measurements, ``decode`` latent -> image,
    ``operator(x)`` -> A(x) (its ``sigma`` is sigma_y for the noise-aware stop unless ``sigma_y``
    is given). ``caps[b]`` is particle b's iteration cap (default ``cfg.max_iters``) and
    ``cap_reasons[b]`` what the cap is called ("max_iters" | "budget"); a cap of 0 means the
    particle does not run (returned unchanged, reason ``cap_reasons[b]``, no decoder pass).
    ``on_iteration(dict(iteration=i, particles=[batch positions evaluated]))`` is called after
    every iteration (for an observer; nothing here reads a clock or waits for the device).
    ``sync_every``: None = the device's choice (``Device.optimizer_sync_every``): the host rule
    (losses read every iteration) on the CPU and by default on CUDA, the device rule
    (``optimizer_masked``: read back every K iterations) on XLA (``xla_sync_every``) and on CUDA
    with ``cuda_sync_every``; an integer K forces the device rule with period K (same iterations,
    stop reasons and latents; decoder counts then include the evaluations of stopped rows before
    the read).
    Returns (z at each particle's stopping point (B, ...), per-particle results).
    """
    setup = Setup.build(z_start, operator, cfg, ids, caps, cap_reasons, sigma_y)
    if sync_every is None:
        sync_every = device.optimizer_sync_every()
    if setup.active and sync_every is not None:
        from .optimizer_masked import run_masked  # noqa: PLC0415 - it imports this module
        run_masked(setup, z_start, y, decode, operator, cfg, device, int(sync_every), on_iteration)
    elif setup.active:
        _run_host(setup, z_start, y, decode, operator, cfg, device, on_iteration)
    return setup.z_out, setup.results


def _run_host(setup: Setup, z_start, y, decode, operator, cfg, device, on_iteration) -> None:
    """The host rule: every iteration reads the active losses and drops the rows that stop."""
    caps, cap_reasons, results, z_out = setup.caps, setup.cap_reasons, setup.results, setup.z_out
    active, param, y_act, opt = setup.start_rows(z_start, y, cfg)   # active: batch positions of the rows
    history: dict[int, list[float]] = {pos: [] for pos in active}
    prev = param.detach().clone()
    i = 0
    with torch.enable_grad():
        while active:
            members = list(active)              # the particles this iteration is charged to
            with_grad = any(i < caps[pos] for pos in active)
            if with_grad:
                opt.zero_grad(set_to_none=True)
                loss = row_losses(param, y_act, decode, operator)
                # One backward per decoder pass under autograd, always (telemetry counts so).
                loss.sum().backward()
            else:                               # every active particle is at its cap
                with torch.no_grad():
                    loss = row_losses(param, y_act, decode, operator)
            setup.charge(active, with_grad)
            values = loss.detach().tolist()
            keep, stopped = [], False
            for row, (pos, value) in enumerate(zip(active, values)):
                r, hist = results[pos], history[pos]
                if i == 0:
                    r.loss_before = value
                reason = _stop_reason(value, i, hist, setup.eps2, setup.noise_level, setup.window,
                                      caps[pos], cap_reasons[pos])
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
            device.iteration_boundary()          # XLA: cut the graph (no wait)
            if on_iteration is not None:
                on_iteration(dict(iteration=i - 1, particles=members))


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


def totals(results: list[ParticleResult]) -> dict:
    """Sums over particles; ``time_s`` / ``iteration_s`` / ``wall_s`` are filled in by telemetry."""
    reasons: dict[str, int] = {}
    for r in results:
        reasons[r.stop_reason] = reasons.get(r.stop_reason, 0) + 1
    return dict(particles=len(results),
                iterations=sum(r.iterations for r in results),
                max_iterations=max((r.iterations for r in results), default=0),
                decoder_forward_backward=sum(r.decoder_forward_backward for r in results),
                decoder_forward_only=sum(r.decoder_forward_only for r in results),
                time_s=sum(r.time_s for r in results), iteration_s=0.0, wall_s=0.0,
                stop_reasons=reasons)
