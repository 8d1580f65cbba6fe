"""One experiment: measurements -> particles -> sampling -> metrics -> files.

Order of work: validate the config, select the device, check the data and the checkpoint (clear
one-line errors, nothing written), prepare the run folder (resume check), then sample every
unfinished measurement of this rank's shard, writing each one's results atomically as soon as it
is done, and finally (rank 0) merge everything into metrics.json.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import distributed
from .baselines import build_baseline
from .config import Settings, to_container, validate
from .data import build_dataset, check_dataset
from .device import Device, select_device
from .metrics import Lpips, default_lpips, evaluate
from .models import build_model
from .modes import coverage, label_modes
from .particles import Particles
from .plan import ResolvedPlan, build_plan
from .record import merge, phase_memory, phase_times
from .results import (RunDir, atomic_save_png, atomic_write_json, git_revision, particle_label, save_grid,
                      unit_name)
from .rng import measurement_generator
from .sampler import SampleOutput, sample
from .search import SearchHooks, build_search
from .search.prior_score import prior_score
from .telemetry import Telemetry

log = logging.getLogger("treedaps")


def measurement_picture(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Log-amplitude of y, scaled to [-1, 1] and resized to the image size (for grids only)."""
    a = torch.log1p(y.float())
    a = (a - a.amin()) / (a.amax() - a.amin()).clamp_min(1e-12)
    return F.interpolate(a[None] * 2 - 1, size=size, mode="bilinear", align_corners=False)[0]


class Experiment:
    """Everything one run needs, built once; ``run()`` processes this rank's measurements."""

    def __init__(self, cfg: DictConfig, overrides: list[str] | None = None):
        self.cfg = cfg
        self.settings: Settings = validate(cfg)
        self.rank = distributed.init(bool(cfg.use_tpu), float(cfg.dist_timeout_min))
        gpu = self.rank.local_rank if self.rank.world > 1 else int(cfg.gpu)
        self.device: Device = select_device(str(cfg.device), gpu, bool(cfg.use_tpu), bool(cfg.deterministic),
                                            cfg.threads, str(cfg.model.name))
        log.info("%s", self.device.startup_line())
        # Data and checkpoint checks come before any heavy work (the toy prior is cheap to build).
        if cfg.data.name == "demo":
            self.model = build_model(cfg.model, self.device)
            self.dataset = build_dataset(cfg.data, self.model)
        else:
            self.dataset = build_dataset(cfg.data)
            self.model = build_model(cfg.model, self.device)
        check_dataset(self.dataset, self.model.image_shape)   # every file, before any sampling
        self.weights_mb = self.device.current_allocated_mb()
        self.hooks: SearchHooks = build_search(self.settings.search, self.model, self.settings.operator,
                                               self.settings.mcmc.tau, self.device)
        self.plan: ResolvedPlan = build_plan(self.settings, self.model)
        self.baseline = build_baseline(cfg, self.model)    # None: LatentDAPS (``sample``)
        if self.baseline is not None:
            self.plan = ResolvedPlan(plan=self.baseline.plan, sigmas=torch.zeros(0))
        if self.rank.is_main:
            for name, r in self.plan.resolved.items():
                log.info("%s=%g -> annealing step %d of %d (sigma %.4g, t %.1f under sigma_mapping=%s; "
                         "%.0f%% of the steps before it)", name, r["timestep"], r["step"],
                         self.settings.annealing.num_steps, r["sigma"], r["step_timestep"],
                         self.model.noise_levels.name, 100 * r["fraction_before"])
            for note in self.plan.notes:
                log.info("note: %s", note)
        self.run_dir = RunDir(Path(cfg.save_dir) / cfg.name)
        self.config_hash = self.run_dir.check_or_init(to_container(cfg), overrides or [],
                                                      write=self.rank.is_main)
        self.lpips: Lpips | None = default_lpips() if "lpips" in self.settings.metrics else None

    # -- the run -------------------------------------------------------------------------------------
    def units(self) -> list[tuple[int, int]]:
        """(dataset position, seed) of every measurement run of this rank still to do."""
        all_units = [(i, s) for i in range(len(self.dataset)) for s in self.settings.seeds]
        mine = self.rank.shard(all_units)
        return [u for u in mine if not self.run_dir.is_done(self._unit(u))]

    def _unit(self, u: tuple[int, int]) -> str:
        pos, seed = u
        return unit_name(self.dataset.start_id + pos, seed, int(self.cfg.seed))

    def run(self) -> dict | None:
        try:
            return self._run()
        finally:
            self.run_dir.unlock()

    def _log_resume(self, todo: list[tuple[int, int]]) -> None:
        mine = self.rank.shard([(i, s) for i in range(len(self.dataset)) for s in self.settings.seeds])
        skipped = [self._unit(u) for u in mine if u not in todo]
        if skipped:
            log.info("resume: %d of %d measurements already done (skipped: %s%s)", len(skipped), len(mine),
                     ", ".join(skipped[:10]), ", ..." if len(skipped) > 10 else "")

    def _run(self) -> dict | None:
        todo = self.units()
        self._log_resume(todo)
        batch = int(self.cfg.batch_size)
        show = bool(self.cfg.progress) and self.rank.is_main
        bar = tqdm(total=len(todo), desc="measurements", disable=not show, dynamic_ncols=True)
        for start in range(0, len(todo), batch):
            self.run_batch(todo[start:start + batch], show)
            bar.update(len(todo[start:start + batch]))
        bar.close()
        distributed.barrier(self.rank, self.run_dir.root, float(self.cfg.dist_timeout_min))
        return self.merge() if self.rank.is_main else None

    def run_batch(self, units: list[tuple[int, int]], show: bool) -> None:
        cfg, s, dev, model = self.cfg, self.settings, self.device, self.model
        items = [self.dataset[pos] for pos, _ in units]
        gt = torch.stack([it["image"] for it in items])
        y = torch.cat([s.operator.measure(gt[m:m + 1], measurement_generator(int(cfg.seed), it["index"]))
                       for m, it in enumerate(items)])
        seeds = [seed for _, seed in units]
        particles = Particles.start(y, [it["index"] for it in items], seeds, int(cfg.num_samples), model.latent_shape,
                                    self.baseline.prior_sigma if self.baseline else s.annealing.sigma_max, dev)
        telemetry = Telemetry(dev, model, s.operator, gt, s.thresholds,
                              bool(cfg.telemetry.diagnostics), bool(cfg.telemetry.pairwise_matrices))
        steps = tqdm(total=self.plan.plan.num_steps, desc="annealing", leave=False, disable=not show,
                     dynamic_ncols=True)

        def callback(event: str, info: dict) -> None:
            telemetry(event, info)
            if event == "step_end":
                steps.update(1)
                last = telemetry.measurements.get(0, [{}])[-1]
                post = {"phase": info["phase"], "n": len(info["particles"])}
                if "loss_z0y" in last:
                    post["loss"] = f"{min(last['loss_z0y']):.3g}"
                if "psnr_z0hat" in last:
                    post["psnr"] = f"{max(last['psnr_z0hat']):.2f}"
                steps.set_postfix(post)

        dev.synchronize()
        t0 = time.perf_counter()
        if self.baseline is not None:
            out = self.baseline.sample(model, s.operator, particles, dev, callback)
        else:
            out = sample(model, s.operator, particles, self.plan.sigmas, self.plan.plan, s.ode, s.mcmc, dev,
                         self.hooks, callback)
        dev.synchronize()
        elapsed = time.perf_counter() - t0
        steps.close()
        telemetry.close()
        self._write_units(units, items, gt, y, out, telemetry, elapsed)

    # -- results -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _write_units(self, units, items, gt, y, out: SampleOutput, telemetry: Telemetry, elapsed: float):
        """One record + tensors + pictures per measurement of the batch (shared costs split evenly)."""
        finals = out.images.float().cpu() if out.images is not None else None
        batch = dict(n=len(units), elapsed=elapsed, telemetry=telemetry)
        for m, ((pos, seed), item) in enumerate(zip(units, items)):
            unit = self._unit((pos, seed))
            rows, images, latents, retired = self._particles_of(m, out, finals)
            scored = [row for row in rows if row["status"] in ("final", "diverged")]
            unavailable = self._score(scored, images, gt[m:m + 1])
            record = self._unit_record(m, item, seed, unit, rows, unavailable, batch)
            tensors = dict(ids=[r["id"] for r in scored], status=[r["status"] for r in scored],
                           images=torch.stack(images) if images else None,
                           latents=torch.stack(latents) if latents else None,
                           gt=gt[m].clone(), y=y[m].clone(),
                           pruned={r.particle_id: r.z for r in retired if r.status == "pruned"})
            self._save_pictures(unit, scored, images, gt[m], y[m])
            self.run_dir.write_unit(unit, record, tensors)

    def _particles_of(self, m: int, out: SampleOutput, finals):
        """Rows (final particles, then retired ones), images and latents of measurement m."""
        rows, images, latents = [], [], []
        for p in range(len(out.particles)):
            if out.particles.measurement[p] == m:
                rows.append(dict(id=out.particles.ids[p], parent=out.particles.parents[p],
                                 status="final", left_at_step=None, loss=float(out.loss[p])))
                images.append(finals[p])
                latents.append(out.particles.z[p].cpu())
        retired = [r for r in out.retired if r.measurement == m]
        for r in retired:
            rows.append(dict(id=r.particle_id, parent=None, status=r.status, left_at_step=r.step,
                             loss=r.loss, reason=r.reason))
            if r.status == "diverged":   # scored on its last finite latent, never best-of-N
                images.append(self.model.decode(r.z[None].to(self.device.torch_device)).float().cpu()[0])
                latents.append(r.z)
        return rows, images, latents, retired

    def _score(self, scored: list[dict], images: list[torch.Tensor], gt: torch.Tensor) -> dict:
        """Metrics and mode labels into the rows; returns {metric: reason} for unavailable ones."""
        unavailable: dict = {}
        if not images:
            return unavailable
        stack = torch.stack(images)
        values = evaluate(gt, stack, self.settings.metrics, lpips=self.lpips)
        for name in self.settings.metrics:
            if values.get(name) is None:
                unavailable[name] = values.get(f"{name}_unavailable_reason", "unavailable")
                continue
            for row, v in zip(scored, values[name].tolist()):
                row[name] = v
        for row, lab in zip(scored, label_modes(gt.expand_as(stack), stack, self.settings.thresholds)):
            row.update(lab)
        if self.cfg.telemetry.get("prior_score", True):   # after the run: not in its time or counts
            scores = prior_score(self.model, stack.to(self.device.torch_device))
            for row, v in zip(scored, scores.tolist()):
                row["prior_score"] = v
        return unavailable

    def _unit_record(self, m: int, item: dict, seed: int, unit: str, rows: list[dict],
                     unavailable: dict, batch: dict) -> dict:
        telemetry, n = batch["telemetry"], batch["n"]
        finals = [r for r in rows if r["status"] == "final"]
        return dict(
            index=item["index"], name=item["name"], seed=seed, unit=unit,
            particles=rows, coverage=coverage([r["mode"] for r in finals], [r["psnr_0"] for r in finals]),
            unavailable=unavailable,
            time=dict(total_s=batch["elapsed"] / n, batch_size=n,
                      phases={k: v / n for k, v in phase_times(telemetry.steps).items()}),
            steps=telemetry.steps, trace=telemetry.measurements.get(m, []),
            events=[dict(event=e["event"], step=e["step"], **e["record"][m])
                    for e in telemetry.events if m in e["record"]],
            vram=phase_memory(telemetry.steps, self.plan.plan),
            peak_reserved_mb=telemetry.peak_reserved_mb,
            compute={k: {kk: vv / n for kk, vv in v.items()} for k, v in telemetry.compute_counts().items()},
            resolved=self.plan.resolved, notes=self.plan.notes, config_hash=self.config_hash,
            particle_steps=self.plan.particle_steps(int(self.cfg.num_samples), int(self.cfg.pruning.num_keep)),
        )

    def _save_pictures(self, unit: str, scored: list[dict], images: list[torch.Tensor],
                       gt: torch.Tensor, y: torch.Tensor) -> None:
        if self.cfg.save_samples:
            for row, img in zip(scored, images):
                atomic_save_png(self.run_dir.root / "samples" / f"{unit}_p{row['id']}.png", img)
        if self.cfg.save_grids and images:
            save_grid(self.run_dir.root / "grids" / f"{unit}.png", [gt, measurement_picture(y, gt.shape[-2:]),
                      *images], ["truth", "|y| (log)", *map(particle_label, scored)])

    def merge(self) -> dict:
        # Only this config's range and seeds: an earlier, larger run in the folder is not mixed in.
        lo = self.dataset.start_id
        hi = lo + len(self.dataset)
        units = [u for u in self.run_dir.load_units()
                 if lo <= u["index"] < hi and u["seed"] in self.settings.seeds]
        reserved = [u.get("peak_reserved_mb") for u in units if u.get("peak_reserved_mb") is not None]
        metadata = dict(
            device=self.device.describe(),
            gpu=dict(peak_vram_mb=_max_step_peak(units), peak_reserved_mb=max(reserved) if reserved else None,
                     weights_mb=self.weights_mb),
            git_revision=git_revision(), config_hash=self.config_hash, name=str(self.cfg.name),
            num_units=len(units), num_samples=int(self.cfg.num_samples), world_size=self.rank.world,
            algorithm=self.baseline.description if self.baseline else "latent_daps",
            written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        merged = merge(units, metadata, self.settings.metrics)
        atomic_write_json(self.run_dir.root / "metrics.json", merged)
        return merged


def _max_step_peak(units: list[dict]) -> float | None:
    peaks = [s.get("peak_mb") for u in units for s in u["steps"]]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict | None:
    return Experiment(cfg, overrides).run()
