"""ReSample's hard data consistency: pixel and latent optimisation, batch-coupled or per particle.

Both optimisations minimise the mean-squared residual between y and A(.) of the variable: pixel
optimisation over the image x (``decode`` = identity), latent optimisation over z through the
decoder. ``coupling`` says how the particles of one measurement share the work:

``independent`` (our method's rule)
    ``search.consistency.optimize_latents``: each particle's own mean-squared loss, its own AdamW
    rows, its own stop test; a stopped particle leaves the batch. It returns the iterate whose loss
    fired the stop test (docs/consistency.md).
``faithful`` (ReSample's code, ``optimize_coupled`` below)
    One loss per measurement, the mean over ALL entries of its particles (``torch.nn.MSELoss`` over
    the batch, as the official driver forms it), one AdamW over the stacked latents, and one stop
    decision read from that scalar: every particle of a measurement runs exactly as many iterations
    as its neighbours. As in the official loop, AdamW steps first and the tests read the loss of
    the iterate before the step, so the returned latent is one step past the loss that stopped it.
    Measurements of one batch stay independent (each is one official run): a measurement that
    stops leaves the batch, its rows of the AdamW state sliced away.

Stop tests (official values): eps (mean-squared loss < eps^2), plateau (the loss is higher than
``plateau_window`` iterations earlier; latent optimisation only), the iteration cap.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..device import Device
from ..search.consistency import OptimizationConfig
from ..search.optimizer import _new_optimizer, _shrink, optimize_latents, row_losses


def settings(lr: float, max_iters: int, eps: float, plateau_window: int, weight_decay: float) -> OptimizationConfig:
    """ReSample's rules as the project's optimiser settings (no noise-aware stop, no budget)."""
    return OptimizationConfig(lr=lr, max_iters=max_iters, eps=eps, plateau_window=plateau_window,
                              weight_decay=weight_decay, noise_aware=False, start="z0hat",
                              schedule="dense", budget=None, final_reserve=0)


def _row(pid: int, cap: int) -> dict:
    return dict(id=pid, iterations=0, time_s=0.0, loss_before=None, loss_after=None, stop_reason="", cap=cap,
                decoder_forward_backward=0, decoder_forward_only=0, skipped=False)


def optimize_coupled(z_start: torch.Tensor, y: torch.Tensor, decode: Callable, operator: Callable,
                     cfg: OptimizationConfig, groups: list[list[int]], device: Device,
                     ids: list[int], count_decoder: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """ReSample's coupled loop, one measurement (``groups[g]``: its batch positions) at a time in
    one batch. Per-particle rows carry the measurement's loss, iterations and stop reason."""
    z_out = z_start.detach().clone()
    rows = [_row(i, int(cfg.max_iters)) for i in ids]
    active = [list(g) for g in groups]                      # groups still optimising
    rows_of = [p for g in active for p in g]                # batch position of each row of ``param``
    param = z_start.detach()[rows_of].clone().requires_grad_(True)
    y_act = y.detach()[rows_of]
    opt = _new_optimizer(param, cfg)
    history: list[list[float]] = [[] for _ in active]
    for i in range(int(cfg.max_iters)):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            per_row = row_losses(param, y_act, decode, operator)
            offsets, losses = 0, []
            for g in active:                                # one MSE over the measurement's entries
                losses.append(per_row[offsets:offsets + len(g)].mean())
                offsets += len(g)
            torch.stack(losses).sum().backward()
        opt.step()                                          # the official loop steps, then tests
        values = [float(v) for v in torch.stack(losses).detach()]
        device.iteration_boundary()
        device.synchronize()
        share = (time.perf_counter() - t0) / len(rows_of)
        keep_groups, keep_rows, offsets = [], [], 0
        for g, value, hist in zip(active, values, history):
            reason = _stop(value, i, hist, cfg)
            hist.append(value)
            for k, pos in enumerate(g):
                r = rows[pos]
                r["iterations"], r["time_s"] = i + 1, r["time_s"] + share
                r["decoder_forward_backward"] += int(count_decoder)
                r["loss_before"] = hist[0] if r["loss_before"] is None else r["loss_before"]
                r["loss_after"] = value
                if reason:
                    r["stop_reason"] = reason
                    z_out[pos] = param.detach()[offsets + k]
            if not reason:
                keep_groups.append(g)
                keep_rows += list(range(offsets, offsets + len(g)))
            offsets += len(g)
        if len(keep_groups) < len(active):
            if not keep_groups:
                return z_out, rows
            param, opt = _shrink(param, opt, keep_rows, cfg)
            y_act = y_act[keep_rows]
            history = [h for g, h in zip(active, history) if g in keep_groups]
            active = keep_groups
            rows_of = [p for g in active for p in g]
    for g in active:                                        # the cap
        for k, pos in enumerate(g):
            rows[pos]["stop_reason"] = "max_iters"
    z_out[rows_of] = param.detach()
    return z_out, rows


def _stop(value: float, i: int, hist: list[float], cfg: OptimizationConfig) -> str:
    """ReSample's tests on the loss L_i of the iterate before step i (``hist`` = L_0 .. L_{i-1})."""
    window = int(cfg.plateau_window)
    if not value == value or value in (float("inf"), float("-inf")):
        return "nonfinite"
    if window > 0 and i >= window and hist[i - window] < value:
        return "plateau"
    if value < cfg.eps ** 2:
        return "eps"
    return ""


def optimize(start: torch.Tensor, y: torch.Tensor, decode: Callable, operator: Callable,
             cfg: OptimizationConfig, coupling: str, groups: list[list[int]], ids: list[int],
             device: Device, count_decoder: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Either coupling; returns (optimised variable, one row per particle)."""
    if coupling == "faithful":
        return optimize_coupled(start, y, decode, operator, cfg, groups, device, ids, count_decoder)
    z, results = optimize_latents(start, y, decode, operator, cfg, device, ids=ids)
    rows = []
    for r in results:
        row = {**_row(r.id, r.cap), **r.as_dict()}
        if not count_decoder:              # pixel optimisation: the "decoder" is the identity
            row["decoder_forward_backward"] = row["decoder_forward_only"] = 0
        rows.append(row)
    return z, rows


def event_record(rows: list[dict], groups: dict[int, list[int]], image_index: list[int], kind: str,
                 coupling: str, wall_s: float) -> dict[int, dict]:
    """{measurement position: {"particles": rows, "totals": ...}}, the sampler's event format."""
    record = {}
    for m, positions in groups.items():
        sub = [dict(rows[p], image_index=image_index[p]) for p in positions]
        reasons: dict[str, int] = {}
        for r in sub:
            reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
        totals = dict(kind=kind, coupling=coupling, start="z0hat", particles=len(sub), batch_particles=len(rows),
                      iterations=sum(r["iterations"] for r in sub),
                      max_iterations=max((r["iterations"] for r in sub), default=0),
                      decoder_forward_backward=sum(r["decoder_forward_backward"] for r in sub),
                      time_s=sum(r["time_s"] for r in sub), wall_s=wall_s, stop_reasons=reasons)
        record[m] = {"particles": sub, "totals": totals}
    return record
