"""The latent optimiser's stop rules on the device, read back every K iterations (XLA always,
CUDA with ``cuda_sync_every``).

``optimizer._run_host`` reads every active particle's loss at every iteration to apply the stop
rules ("eps", "noise", "plateau", cap, "nonfinite"; ``treedaps.search.consistency``'s docstring)
and drops the rows that stop: each read is a device sync (on CUDA the host waits for every
iteration). Here the same rules are
evaluated as masks on the device. A row whose rule fires is frozen, not removed: its loss no
longer enters the objective and its AdamW update is undone (``torch.where`` back to the iterate
before the step), so its latent stays the iterate at which it stopped ("nonfinite": the one
before, as in the host loop), exactly as if it had left. The host reads the stop decisions every
``sync_every`` iterations (one small transfer) and then drops the finished rows (``_shrink``), and
once more when every row must have stopped (the largest cap). The surviving rows see the same
operations on the same values as in the host loop (the objective is a sum of per-row means, the
decoder, the FFT and AdamW act row by row), so iterations, stop reasons, losses and latents are
equal; on the toy prior on the CPU, bit for bit (tests/test_optimizer_masked.py).

Thresholds: the host compares Python floats (the float32 loss widened to double) with double
thresholds; here float32 losses are compared with the float32 bound that gives the same answers
(``_bound``). The plateau test uses a shift register of the last ``plateau_window`` losses. What
differs: a stopped row is still decoded until the next read (at most K - 1 evaluations), and
those evaluations are charged to it (``decoder_forward_backward`` / ``_only``), so the counts
still sum to what the decoder did; with K = 1 they equal the host loop's.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .optimizer import Setup, _shrink, row_losses

# Stop codes on the device, in the host rule's order of precedence; 5 = the particle's cap reason.
CODES = {1: "nonfinite", 2: "eps", 3: "noise", 4: "plateau"}
CAP = 5


def _bound(threshold: float, dtype: torch.dtype, strict: bool) -> float:
    """The ``dtype`` value t such that ``v < t`` (strict) or ``v <= t`` decides, for every ``v`` of
    that dtype, exactly as ``float(v) < threshold`` (or ``<=``) does in double precision."""
    t = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    exact = float(t)
    if strict and exact < threshold:
        t = torch.nextafter(t, torch.tensor(float("inf"), dtype=dtype))
    elif not strict and exact > threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return float(t)


@dataclass
class RowState:
    """Per-row device tensors (dim 0 = row of the parameter; ``history`` is (window, rows))."""

    running: torch.Tensor       # bool: no rule has fired yet
    code: torch.Tensor          # long: 0 running, else CODES / CAP
    stopped_at: torch.Tensor    # long: the evaluation i at which the rule fired
    caps: torch.Tensor          # long: per-row iteration cap
    loss_before: torch.Tensor   # L_0
    loss_after: torch.Tensor    # the returned iterate's loss (NaN for "nonfinite" at i = 0)
    last: torch.Tensor          # L_{i-1}
    history: torch.Tensor       # L_{i-window} .. L_{i-1}, +inf before the window is full

    @classmethod
    def start(cls, caps: list[int], window: int, device, dtype) -> "RowState":
        n = len(caps)
        nan = torch.full((n,), float("nan"), dtype=dtype, device=device)
        return cls(torch.ones(n, dtype=torch.bool, device=device), torch.zeros(n, dtype=torch.long, device=device),
                   torch.zeros(n, dtype=torch.long, device=device),
                   torch.tensor(caps, dtype=torch.long, device=device), nan, nan, nan,
                   torch.full((window, n), float("inf"), dtype=dtype, device=device))

    def select(self, index: torch.Tensor) -> "RowState":
        return RowState(**{f.name: getattr(self, f.name).index_select(1 if f.name == "history" else 0, index)
                           for f in fields(self)})


def _update(st: RowState, loss: torch.Tensor, i: int, it: torch.Tensor, lt_eps: float,
            le_noise: float | None, window: int) -> torch.Tensor:
    """Apply the stop rules to evaluation i's losses; returns the rows to put back to z_{i-1}."""
    zero = torch.zeros_like(st.code)
    nonfinite = ~torch.isfinite(loss)
    code = torch.where(it >= st.caps, zero + CAP, zero)
    if window > 0:
        code = torch.where(loss > st.history[0], zero + 4, code)
        st.history = torch.cat([st.history[1:], loss[None]])
    if le_noise is not None:
        code = torch.where(loss <= le_noise, zero + 3, code)
    code = torch.where(loss < lt_eps, zero + 2, code)
    code = torch.where(nonfinite, zero + 1, code)
    new = st.running & (code > 0)
    st.code = torch.where(new, code, st.code)
    st.stopped_at = torch.where(new, it, st.stopped_at)
    if i == 0:
        st.loss_before = loss
    st.loss_after = torch.where(new, torch.where(nonfinite, st.last, loss), st.loss_after)
    st.last = loss
    st.running = st.running & ~new
    return new & nonfinite & (it > 0)


def run_masked(setup: Setup, z_start, y, decode, operator, cfg, device, sync_every: int,
               on_iteration=None) -> None:
    """The device rule (module docstring); fills ``setup.results`` and ``setup.z_out``."""
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    caps = setup.caps
    rows, param, y_act, opt = setup.start_rows(z_start, y, cfg)   # rows: batch positions of param's rows
    prev = param.detach().clone()
    st = it = None
    i = 0
    with torch.enable_grad():
        while rows:
            with_grad = any(i < caps[pos] for pos in rows)
            if with_grad:
                opt.zero_grad(set_to_none=True)
                loss = row_losses(param, y_act, decode, operator)
                if st is None:
                    dtype = loss.dtype
                    st = RowState.start([caps[p] for p in rows], setup.window, param.device, dtype)
                    it = torch.zeros((), dtype=torch.long, device=param.device)
                    lt_eps = _bound(setup.eps2, dtype, strict=True)
                    le_noise = None if setup.noise_level is None else _bound(setup.noise_level, dtype, strict=False)
                # Frozen rows leave the objective (their gradient is 0 and never used).
                torch.where(st.running, loss, torch.zeros_like(loss)).sum().backward()
            else:                                # every row is at its cap: all stop now
                with torch.no_grad():
                    loss = row_losses(param, y_act, decode, operator)
            setup.charge(rows, with_grad)
            with torch.no_grad():
                back = _update(st, loss.detach(), i, it, lt_eps, le_noise, setup.window)
                param.copy_(torch.where(_rows(back, param), prev, param))
                prev = param.detach().clone()
                if with_grad:
                    opt.step()
                    param.copy_(torch.where(_rows(st.running, param), param, prev))
                it = it + 1
            i += 1
            device.iteration_boundary()          # XLA: cut the graph (no wait)
            if on_iteration is not None:
                on_iteration(dict(iteration=i - 1, particles=list(rows)))
            if i % sync_every == 0 or i > max(caps[pos] for pos in rows):
                keep = _read_back(st, rows, param, setup)
                if len(keep) < len(rows):
                    rows = [rows[k] for k in keep]
                    if rows:
                        keep_t = torch.tensor(keep, dtype=torch.long, device=param.device)
                        param, opt = _shrink(param, opt, keep, cfg)
                        y_act = y_act.index_select(0, keep_t.to(y_act.device))
                        prev = prev.index_select(0, keep_t)
                        st = st.select(keep_t)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.ndim - 1))


def _read_back(st: RowState, rows: list[int], param: torch.Tensor, setup: Setup) -> list[int]:
    """One transfer of the stop decisions; records the finished rows, returns the others' rows."""
    state = torch.stack([st.code.float(), st.stopped_at.float(), st.loss_before.float(),
                         st.loss_after.float()]).tolist()
    keep, done, done_rows = [], [], []
    for row, pos in enumerate(rows):
        code = int(state[0][row])
        if code == 0:
            keep.append(row)
            continue
        r = setup.results[pos]
        r.stop_reason = setup.cap_reasons[pos] if code == CAP else CODES[code]
        r.iterations, r.loss_before = int(state[1][row]), state[2][row]
        r.loss_after = None if code == 1 and r.iterations == 0 else state[3][row]
        done.append(pos)
        done_rows.append(row)
    if done:
        where = torch.tensor(done, dtype=torch.long, device=setup.z_out.device)
        picked = param.detach().index_select(0, torch.tensor(done_rows, dtype=torch.long, device=param.device))
        setup.z_out.index_copy_(0, where, picked.to(setup.z_out.device))
    return keep
