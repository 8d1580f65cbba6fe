"""Telemetry: what the sampler's callback reports, turned into numbers (never changes the run).

Per annealing step of a batch: wall time (device synchronised, telemetry's own work excluded),
peak accelerator memory (peak counter reset at every step start and around the pruning and the
latent optimisation), number of live particles. Per measurement and step: the full pairwise
distance matrix and its mean over the flattened z0y of that measurement's particles, the exact
measurement loss of each particle's z0y, and (when the ground truth is known) the mode label of
each particle's decoded z0hat. Compute counts come from forward hooks on the model's decoder and
denoiser modules: calls and particle-evaluations, split into forward-only and forward+backward
(a decoder pass under autograd is always followed by exactly one backward pass). A dry-run pruning
(``pruning.dry_run``) is observation too: its decodes are not counted. Every step also records a
fingerprint of each particle's z0y (``fingerprints``) for honest pairing between runs.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager

import torch

from .device import Device
from .modes import ModeThresholds, label_modes
from .models.base import LatentModel
from .operators import PhaseRetrieval


def fingerprints(z: torch.Tensor) -> list[str]:
    """Per particle (row of ``z``): 16 hex characters of a BLAKE2b hash of its bytes, dtype and shape.

    Equal fingerprints mean bitwise-equal latents; the report uses them to tell whether two runs
    are bitwise-paired (identical up to a step) or only stream-paired (same random streams, other
    rounding: batch composition changes float rounding on the real networks)."""
    rows = z.detach().cpu().contiguous()
    out = []
    for row in rows:
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{row.dtype}{tuple(row.shape)}".encode())
        h.update(row.view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out


class ModuleCounter:
    """Counts calls and batch items through a module with a forward hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.items = self.items_with_grad = 0
        self.batch_sizes: list[int] = []
        self.enabled = True
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if not self.enabled:
            return
        batch = int(args[0].shape[0])
        self.calls += 1
        self.items += batch
        self.batch_sizes.append(batch)
        if torch.is_grad_enabled() and args[0].requires_grad:
            self.items_with_grad += batch

    def snapshot(self) -> dict:
        return dict(calls=self.calls, particle_evals=self.items, particle_evals_with_backward=self.items_with_grad)

    def remove(self) -> None:
        self._handle.remove()


class Telemetry:
    """The sampler's ``callback``; one instance per batch of measurements."""

    def __init__(self, device: Device, model: LatentModel, operator: PhaseRetrieval,
                 gt: torch.Tensor | None = None, thresholds: ModeThresholds = ModeThresholds(),
                 diagnostics: bool = True, record_matrices: bool = True):
        self.device, self.model, self.operator = device, model, operator
        self.gt = gt
        self.thresholds = thresholds
        self.diagnostics = diagnostics
        self.record_matrices = record_matrices
        self.steps: list[dict] = []                  # batch-level, one per annealing step
        self.measurements: dict[int, list[dict]] = {}  # per measurement position, one per step
        self.events: list[dict] = []                 # prune / optimize records
        modules = model.hookable_modules()
        self.counters = {name: ModuleCounter(m) for name, m in modules.items()}
        self._t0 = self._mark = 0.0
        self._current: dict = {}
        self._opt_snapshot: dict = {}
        self.peak_reserved_mb: float | None = None
        self.optimization_counts = {"calls": 0, "particle_evals": 0, "particle_evals_with_backward": 0}

    # -- clocks and memory -------------------------------------------------------------------------
    def _clock(self) -> float:
        self.device.synchronize()
        return time.perf_counter()

    def _peak(self) -> float | None:
        """Allocated peak since the last reset (the reserved peak is kept as a running maximum)."""
        mem = self.device.memory_mb()
        if mem is None:
            return None
        if mem.get("reserved_mb") is not None:
            self.peak_reserved_mb = max(self.peak_reserved_mb or 0.0, mem["reserved_mb"])
        return mem["allocated_mb"]

    def _set_counting(self, on: bool) -> None:
        for c in self.counters.values():
            c.enabled = on

    @contextmanager
    def _own_work(self):
        """Telemetry's own decodes are not counted as the algorithm's compute."""
        self._set_counting(False)
        try:
            with torch.no_grad():
                yield
        finally:
            self._set_counting(True)

    # -- the callback --------------------------------------------------------------------------------
    def __call__(self, event: str, info: dict) -> None:
        getattr(self, "_on_" + event)(info)

    def _on_step_start(self, info: dict) -> None:
        self.device.reset_peak()
        self._current = dict(step=info["step"], sigma=info["sigma"], phase=info["phase"],
                             particles_in=len(info["particles"]), prune_s=0.0, optimize_s=0.0,
                             peak_mb=None, prune_peak_mb=None, optimize_peak_mb=None)
        self._t0 = self._mark = self._clock()

    def _on_prune_start(self, info: dict) -> None:
        if info.get("dry_run"):         # an observation: its decodes are not the algorithm's compute
            self._set_counting(False)
        self._mark = self._clock()

    def _on_prune_end(self, info: dict) -> None:
        self._set_counting(True)
        self._current["prune_s"] = self._clock() - self._mark
        self._current["prune_peak_mb"] = self._peak()   # the pruning's own work: pre-pruning memory
        self.device.reset_peak()
        self.events.append(dict(event="prune", step=info["step"], record=info["record"]))

    def _on_optimize_start(self, info: dict) -> None:
        dec = self.counters.get("decoder")
        if dec is not None:
            self._opt_snapshot = dec.snapshot()
        self._mark = self._clock()
        self._current["pre_optimize_peak_mb"] = self._peak()
        self.device.reset_peak()

    def _on_optimize_end(self, info: dict) -> None:
        self._current["optimize_s"] = self._clock() - self._mark
        dec = self.counters.get("decoder")
        if dec is not None and self._opt_snapshot:
            now = dec.snapshot()
            for k in now:
                self.optimization_counts[k] += now[k] - self._opt_snapshot[k]
        self._current["optimize_peak_mb"] = self._peak()
        split_event_time(info["record"], self._current["optimize_s"])
        self.events.append(dict(event="optimize", step=info["step"], record=info["record"]))

    def _on_step_end(self, info: dict) -> None:
        cur = self._current
        cur["time_s"] = self._clock() - self._t0
        peaks = [p for p in (self._peak(), cur.pop("pre_optimize_peak_mb", None), cur["optimize_peak_mb"])
                 if p is not None]
        cur["peak_mb"] = max(peaks) if peaks else None
        cur["particles_out"] = len(info["particles"])
        self.steps.append(cur)
        self._per_measurement(info)

    # -- per-measurement diagnostics -----------------------------------------------------------------
    def _per_measurement(self, info: dict) -> None:
        particles, z0y, z0hat = info["particles"], info["z0y"], info["z0hat"]
        with self._own_work():
            loss = loss_hat = labels = None
            if self.diagnostics and len(particles):
                loss = self.operator.loss(self.model.decode(z0y), particles.y).tolist()
                x0hat = self.model.decode(z0hat)
                loss_hat = self.operator.loss(x0hat, particles.y).tolist()
                if self.gt is not None:
                    gt = self.gt.to(z0hat.device)[particles.measurement]
                    labels = label_modes(gt, x0hat, self.thresholds)
            prints = fingerprints(z0y)
            for m, positions in particles.groups().items():
                flat = z0y[positions].flatten(1).double()
                dist = torch.cdist(flat, flat)
                n = len(positions)
                mean = float(dist.sum() / (n * (n - 1))) if n > 1 else 0.0
                rec = dict(step=info["step"], ids=[particles.ids[p] for p in positions],
                           mean_pairwise_z0y=mean, fingerprint_z0y=[prints[p] for p in positions])
                if self.record_matrices:
                    rec["pairwise_z0y"] = dist.tolist()
                if loss is not None:
                    rec["loss_z0y"] = [loss[p] for p in positions]
                    rec["loss_z0hat"] = [loss_hat[p] for p in positions]
                if labels is not None:
                    rec["mode_z0hat"] = [labels[p]["mode"] for p in positions]
                    rec["psnr_z0hat"] = [labels[p]["psnr_0"] for p in positions]
                self.measurements.setdefault(m, []).append(rec)

    # -- summaries -----------------------------------------------------------------------------------
    def compute_counts(self) -> dict:
        out = {name: c.snapshot() for name, c in self.counters.items()}
        if "decoder" in out:
            out["decoder_in_optimization"] = dict(self.optimization_counts)
        return out

    def close(self) -> None:
        for c in self.counters.values():
            c.remove()


def split_event_time(record: dict, seconds: float) -> None:
    """Time of one optimisation event into its record: per particle, ``time_s`` = the event's time x
    its share of the event's decoder evaluations (each evaluation is one particle's decoder pass,
    so the shares follow the work; a particle that did not run gets 0; an event without decoder
    passes, ReSample's pixel-space optimisation, splits by iterations instead); per measurement,
    ``totals.time_s`` = the sum over its particles, and ``wall_s`` = ``iteration_s`` = the whole
    event's time (shared by every measurement of the batch). The optimiser itself reads no clock."""
    rows = [row for rec in record.values() for row in rec["particles"]]
    evals = [row["decoder_forward_backward"] + row["decoder_forward_only"] for row in rows]
    if not sum(evals):
        evals = [row.get("iterations", 0) for row in rows]
    total = sum(evals)
    for row, n in zip(rows, evals):
        row["time_s"] = seconds * n / total if total else 0.0
    for rec in record.values():
        rec["totals"].update(time_s=sum(row["time_s"] for row in rec["particles"]),
                             wall_s=seconds, iteration_s=seconds)

