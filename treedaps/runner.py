"""One experiment: measurements -> particles -> sampling -> metrics -> files.

Order of work: validate the config, select the device, check the data and the checkpoint (clear
one-line errors, nothing written), prepare the run folder (resume check), then sample every
unfinished measurement of this rank's shard, writing each one's results atomically as soon as it
is done, and finally (rank 0) merge everything into metrics.json.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import distributed, record
from .baselines import build_baseline
from .config import Settings, to_container, validate
from .data import build_dataset, check_dataset
from .device import Device, XlaOptions, select_device, sync_every_key
from .metrics import Lpips, default_lpips, evaluate
from .models import build_model
from .modes import label_modes
from .particles import Particles
from .plan import ResolvedPlan, build_plan
from .precision import RECOMPILE_LIMIT, Precision, apply_flags, prepare_model
from .prewarm import compilations_since, compile_count, prewarm
from .results import RunDir, atomic_write_json, git_revision, save_unit_pictures, unit_name
from .rng import measurement_generator
from .sampler import SampleOutput, sample
from .search import SearchHooks, build_search
from .search.prior_score import prior_score
from .telemetry import Telemetry
from .throughput import auto_batch_size

log = logging.getLogger("treedaps")


class Experiment:
    """Everything one run needs, built once; ``run()`` processes this rank's measurements."""

    def __init__(self, cfg: DictConfig, overrides: list[str] | None = None):
        self.cfg = cfg
        self.settings: Settings = validate(cfg)
        self.rank = distributed.init(bool(cfg.use_tpu), float(cfg.dist_timeout_min))
        gpu = self.rank.local_rank if self.rank.world > 1 else int(cfg.gpu)
        self.device: Device = select_device(str(cfg.device), gpu, bool(cfg.use_tpu), bool(cfg.deterministic),
                                            cfg.threads, str(cfg.model.name))
        self.device.xla = XlaOptions.from_config(cfg)
        self.device.cuda_sync_every = sync_every_key(cfg, "cuda_sync_every", None)
        self.precision = Precision.from_config(cfg)
        apply_flags(self.precision.mode)          # global, like the determinism flags
        log.info("%s", self.device.startup_line())
        log.info("%s", self.precision.startup_line())
        if self.precision.compile == "static" and cfg.batch_size != 1:
            log.warning("WARNING: compile=static with batch_size=%s builds and pre-warms one graph per particle "
                        "count the run meets, and the optimiser's active sets take every count up to the "
                        "batch's particles (each graph ~35 s for the full-size decoder on an H200; past %d, "
                        "dynamo runs the rest eagerly); batch_size=1, or compile=dynamic without cuda_graphs, "
                        "keeps it to a few", cfg.batch_size, RECOMPILE_LIMIT)
        # Data and checkpoint checks come before any heavy work (the toy prior is cheap to build).
        if cfg.data.name == "demo":
            self.model = build_model(cfg.model, self.device)
            self.dataset = build_dataset(cfg.data, self.model)
        else:
            self.dataset = build_dataset(cfg.data)
            self.model = build_model(cfg.model, self.device)
        check_dataset(self.dataset, self.model.image_shape)   # every file, before any sampling
        prepare_model(self.model, self.precision)
        self.weights_mb = self.device.current_allocated_mb()
        self.hooks: SearchHooks = build_search(self.settings.search, self.model, self.settings.operator,
                                               self.settings.mcmc.tau, self.device)
        self.plan: ResolvedPlan = build_plan(self.settings, self.model)
        # None: LatentDAPS (``sample``)
        self.baseline = build_baseline(self.settings.algorithm, self.settings.resample, self.model)
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
        batch = self.batch_size(len(todo))
        if (self.device.xla.prewarm or self.precision.compile != "off") and todo:
            self.prewarm_record = prewarm(self, min(batch, len(todo)))   # compile before the first clock
        show = bool(self.cfg.progress) and self.rank.is_main
        bar = tqdm(total=len(todo), desc="measurements", disable=not show, dynamic_ncols=True)
        for start in range(0, len(todo), batch):
            self.run_batch(todo[start:start + batch], show)
            bar.update(len(todo[start:start + batch]))
        bar.close()
        distributed.barrier(self.rank, self.run_dir.root, float(self.cfg.dist_timeout_min))
        return self.merge() if self.rank.is_main else None

    def batch_size(self, todo: int) -> int:
        """Measurements per batch: the config's number, or ``auto`` (throughput.py)."""
        if self.cfg.batch_size != "auto":
            return int(self.cfg.batch_size)
        if todo == 0:
            return 1
        n, self.batch_probe = auto_batch_size(self.model, self.settings.operator, self.device,
                                              int(self.cfg.num_samples), todo,
                                              cuda_graphs=self.precision.cuda_graphs)
        return n

    def run_batch(self, units: list[tuple[int, int]], show: bool) -> None:
        """Load, measure, start, sample, then record and write each measurement of one batch."""
        cfg, s, dev, model = self.cfg, self.settings, self.device, self.model
        items = [self.dataset[pos] for pos, _ in units]
        gt = torch.stack([it["image"] for it in items])
        y = torch.cat([s.operator.measure(gt[m:m + 1], measurement_generator(int(cfg.seed), it["index"]))
                       for m, it in enumerate(items)])
        particles = Particles.start(y, [it["index"] for it in items], [seed for _, seed in units],
                                    int(cfg.num_samples), model.latent_shape,
                                    self.baseline.prior_sigma if self.baseline else s.annealing.sigma_max, dev)
        telemetry = Telemetry(dev, model, s.operator, gt, s.thresholds,
                              bool(cfg.telemetry.diagnostics), bool(cfg.telemetry.pairwise_matrices))
        compiled0 = self._compilations()
        with self._progress(telemetry, show) as callback:
            dev.synchronize()
            t0 = time.perf_counter()
            if self.baseline is not None:
                out = self.baseline.sample(model, s.operator, particles, dev, callback)
            else:
                out = sample(model, s.operator, particles, self.plan.sigmas, self.plan.plan, s.ode, s.mcmc, dev,
                             self.hooks, callback)
            dev.synchronize()
            elapsed = time.perf_counter() - t0
        telemetry.close()
        compiled = compilations_since(compiled0, self.device.kind)
        if compiled:
            why = ("the pre-warm missed a shape (treedaps/prewarm.py)" if getattr(self, "prewarm_record", None)
                   else "no pre-warm ran (on XLA: xla_prewarm=true)")
            log.warning("%d graph(s) compiled while measurements %s ran, so their times include the "
                        "compilation: %s", compiled, ", ".join(self._unit(u) for u in units), why)
        self._write_units(units, items, gt, y, out, telemetry, elapsed, compiled)

    def _compilations(self) -> int | None:
        """Graphs compiled so far in this process (torch.compile's, or XLA's); None when nothing is
        compiled (``compile=off`` off XLA) or the count is unknown."""
        if self.precision.compile == "off" and self.device.kind != "xla":
            return None
        return compile_count(self.device.kind)

    @contextmanager
    def _progress(self, telemetry: Telemetry, show: bool):
        """The sampler's callback: telemetry, and the annealing bar with the best loss / PSNR."""
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

        try:
            yield callback
        finally:
            steps.close()

    # -- results -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _write_units(self, units, items, gt, y, out: SampleOutput, telemetry: Telemetry, elapsed: float,
                     compiled: int | None):
        """One record + tensors + pictures per measurement of the batch (shared costs split evenly;
        ``compiled``: graphs compiled while the batch ran, recorded whole on each of its units)."""
        finals = out.images.float().cpu() if out.images is not None else None
        pruning, num_samples = self.settings.search.pruning, int(self.cfg.num_samples)
        particle_steps = self.plan.particle_steps(num_samples, pruning.num_keep if pruning else num_samples)
        for m, ((pos, seed), item) in enumerate(zip(units, items)):
            unit = self._unit((pos, seed))
            rows, images, latents, retired = record.particle_rows(out, m, finals, self._decode)
            scored = [row for row in rows if row["status"] in ("final", "diverged")]
            unavailable = self._score(scored, images, gt[m:m + 1])
            unit_record = record.unit_record(
                item, seed, unit, rows, unavailable, m=m, n=len(units), elapsed=elapsed, telemetry=telemetry,
                plan=self.plan, config_hash=self.config_hash,
                particle_steps=particle_steps, compilations=compiled)
            save_unit_pictures(self.run_dir.root, unit, scored, images, gt[m], y[m], bool(self.cfg.save_samples),
                               bool(self.cfg.save_grids))
            self.run_dir.write_unit(unit, unit_record, record.unit_tensors(scored, images, latents, gt[m], y[m],
                                                                           retired))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z[None].to(self.device.torch_device)).float().cpu()[0]

    def _score(self, scored: list[dict], images: list[torch.Tensor], gt: torch.Tensor) -> dict:
        """Metrics, mode labels and prior scores of the scored particles into their rows."""
        if not images:
            return {}
        stack = torch.stack(images)
        values = evaluate(gt, stack, self.settings.metrics, lpips=self.lpips)
        labels = label_modes(gt.expand_as(stack), stack, self.settings.thresholds)
        prior = None
        if self.cfg.telemetry.get("prior_score", True):   # after the run: not in its time or counts
            prior = prior_score(self.model, stack.to(self.device.torch_device)).tolist()
        return record.score_rows(scored, values, self.settings.metrics, labels, prior)

    def merge(self) -> dict:
        # Only this config's range and seeds: an earlier, larger run in the folder is not mixed in.
        lo = self.dataset.start_id
        hi = lo + len(self.dataset)
        units = [u for u in self.run_dir.load_units()
                 if lo <= u["index"] < hi and u["seed"] in self.settings.seeds]
        metadata = dict(
            device=self.device.describe(),
            precision=dict(self.precision.describe(), prewarm=getattr(self, "prewarm_record", None)
                           if self.precision.compile != "off" else None,
                           timed_with_compilation=record.timed_with_compilation(units)),
            batch_size=dict(config=self.cfg.batch_size, probe=getattr(self, "batch_probe", None)),
            gpu=record.gpu_peaks(units, self.weights_mb),
            git_revision=git_revision(), config_hash=self.config_hash, name=str(self.cfg.name),
            num_units=len(units), num_samples=int(self.cfg.num_samples), world_size=self.rank.world,
            algorithm=self.baseline.description if self.baseline else "latent_daps",
            xla=(dict(self.device.xla.as_dict(), prewarm=getattr(self, "prewarm_record", None))
                 if self.device.kind == "xla" else None),
            optimizer_sync_every=self.device.optimizer_sync_every(),
            written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        merged = record.merge(units, metadata, self.settings.metrics)
        atomic_write_json(self.run_dir.root / "metrics.json", merged)
        return merged


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict | None:
    return Experiment(cfg, overrides).run()
