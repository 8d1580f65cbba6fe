"""Validation of the merged Hydra config, and its translation into the typed pieces the code uses.

Every check raises ``ConfigError`` with one line that names the key, before any heavy work. Every
number anywhere in the config must be finite: ``repulsion_scale=nan`` would otherwise compare
false with every bound and silently mean "off".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .baselines.settings import ALGORITHMS, ResampleConfig
from .device import XlaOptions, sync_every_key
from .errors import ConfigError
from .mcmc import MCMCConfig
from .modes import ModeThresholds
from .operators import PhaseRetrieval
from .precision import Precision
from .schedules import AnnealingConfig, ODEConfig
from .search.consistency import OptimizationConfig
from .search.pruning import PruningConfig
from .search.settings import FLAGS, RepulsionConfig, SearchSettings

__all__ = ["ConfigError", "Settings", "moved_key", "moved_message", "validate", "to_container"]


# The run's own top-level keys (scalars and lists), written once here.
RUN_KEYS = ("name", "save_dir", "seed", "seeds", "num_samples", "repulsion_scale", "pruning_step",
            "optimization_step", "branch_timestep", "use_tpu", "device", "gpu", "batch_size", "num_runs",
            "task_group", "eval_fn_list", "save_samples", "save_grids", "progress", "deterministic",
            "threads", "dist_timeout_min", "algorithm", "precision", "compile", "channels_last",
            "cuda_graphs", "nhwc_group_norm", "cuda_sync_every", "tpu_cores", "xla_cache_dir", "xla_sync_every",
            "xla_rng", "xla_prewarm")
TELEMETRY_KEYS = ("diagnostics", "pairwise_matrices", "prior_score")
# DAPS's mcmc_sampler_config names -> MCMCConfig fields; prior_sigma_min is DAPS's and unused here.
MCMC_NAMES = {"mc_algo": "algo"}
MCMC_IGNORED = ("prior_sigma_min",)


def _fields(cls, add: tuple = ()) -> set[str]:
    return {f.name for f in fields(cls)} | set(add)


# Top-level keys and, for blocks, their allowed sub-keys (a dict for a nested block; None =
# free-form, checked elsewhere). The search block mirrors treedaps/search/ (one block per module,
# its keys the dataclass's fields, plus the part's switch `step`: the flat flag's copy, FLAGS).
SCHEMA: dict[str, set | dict | None] = {
    **{key: set() for key in RUN_KEYS},
    "data": None, "model": None, "task": None, "sampler": None,
    "modes": _fields(ModeThresholds),
    "telemetry": set(TELEMETRY_KEYS),
    "search": {"branch_timestep": set(), "repulsion": _fields(RepulsionConfig),
               "pruning": _fields(PruningConfig, add=("step",)),
               "optimization": _fields(OptimizationConfig, add=("step", "preset"))},  # preset: PRESETS' name
    "resample": _fields(ResampleConfig),
}
# Blocks that were top-level before the search block (issue 9): an old key gets its new name.
MOVED = ("repulsion", "pruning", "optimization")
_DAPS_NAME = {field: daps for daps, field in MCMC_NAMES.items()}
MCMC_KEYS = {_DAPS_NAME.get(f.name, f.name) for f in fields(MCMCConfig)} | set(MCMC_IGNORED)
METRICS = ("psnr", "ssim", "lpips")
# Keys read as numbers (a string there would fail inside float() without naming the key).
NUMBERS = ("seed", "num_samples", "num_runs", "repulsion_scale", "pruning_step",
           "optimization_step", "branch_timestep", "modes.min_psnr", "modes.margin",
           "sampler.annealing_scheduler_config.sigma_max")


def _fail(msg: str):
    raise ConfigError(msg)


def moved_key(key: str) -> str | None:
    """The new name of a key of an old top-level search block (``pruning.num_keep`` ->
    ``search.pruning.num_keep``), or None."""
    key = key.lstrip("+~")
    return f"search.{key}" if key.split(".", 1)[0] in MOVED else None


def moved_message(key: str) -> str:
    return (f"'{key.lstrip('+~')}' is now '{moved_key(key)}': the search knobs are nested in the "
            f"search: block, mirroring treedaps/search/ (docs/config.md)")


def check_keys(cfg: DictConfig, schema: dict = SCHEMA, prefix: str = "") -> None:
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            if not prefix and key in MOVED:
                sub = next(iter(cfg[key].keys()), "") if isinstance(cfg[key], DictConfig) else ""
                _fail(moved_message(f"{key}.{sub}" if sub else key))
            _fail(f"unknown config key '{name}' (known: {', '.join(sorted(schema))})")
        allowed = schema[key]
        if isinstance(allowed, dict) and isinstance(cfg[key], DictConfig):
            check_keys(cfg[key], allowed, name + ".")
        elif allowed and isinstance(cfg[key], DictConfig):
            for sub in cfg[key].keys():
                if sub not in allowed:
                    _fail(f"unknown config key '{name}.{sub}' (known: {', '.join(sorted(allowed))})")


def check_flag_copies(cfg: DictConfig) -> None:
    """The search block's copies of the flat flags (FLAGS) hold the flags' values: the flag is the
    key to set (a copy set on its own would run what config.yaml's flag does not say)."""
    for path, flag in FLAGS.items():
        value = OmegaConf.select(cfg, f"search.{path}")
        if value != cfg[flag]:
            _fail(f"search.{path}={value} differs from {flag}={cfg[flag]}: set {flag} (search.{path} "
                  f"copies it)")


def check_finite(cfg: DictConfig) -> None:
    """Refuse nan / inf in any key of the resolved config (one line naming the key)."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        _fail(f"cannot resolve the config: {' '.join(str(err).split())}")

    def walk(value, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            _fail(f"{key}={value} is not a finite number")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            walk(v, f"{key}.{k}" if isinstance(k, str) else f"{key}[{k}]")

    for k, v in values.items():
        walk(v, str(k))
    group = f"task.{cfg.get('task_group')}.mcmc_sampler_config"
    numbers = [*NUMBERS, *(f"{group}.{k}" for k in ("num_steps", "lr", "tau", "lr_min_ratio")),
               *(f"sampler.{s}_scheduler_config.{k}" for s in ("annealing", "diffusion")
                 for k in ("num_steps", "sigma_min"))]
    for key in numbers:
        value = OmegaConf.select(cfg, key, default=0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(f"{key} must be a number, got {value!r}")


def _poly(scheduler: DictConfig, where: str) -> int:
    if scheduler.get("name", "edm") != "edm":
        _fail(f"{where}.name must be 'edm' (LatentDAPS's scheduler), got {scheduler.name!r}")
    timestep = str(scheduler.get("timestep", "poly-7"))
    if not timestep.startswith("poly-") or not timestep[5:].isdigit():
        _fail(f"{where}.timestep must be 'poly-<int>', got {timestep!r}")
    return int(timestep[5:])


@dataclass(frozen=True)
class Settings:
    """The typed pieces of one run's config."""

    annealing: AnnealingConfig
    ode: ODEConfig
    mcmc: MCMCConfig
    operator: PhaseRetrieval
    thresholds: ModeThresholds
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    search: SearchSettings = SearchSettings()
    algorithm: str = "latent_daps"
    resample: ResampleConfig = ResampleConfig()


def validate(cfg: DictConfig) -> Settings:
    """Check every key the run uses; one-line ``ConfigError`` on the first problem."""
    check_keys(cfg)
    check_finite(cfg)
    if cfg.data.get("name") == "demo" and cfg.model.get("name") != "toy":
        _fail(f"data=demo holds the embedded prior's own images: it needs model=toy, not "
              f"model.name={cfg.model.get('name')!r}")
    if int(cfg.num_runs) != 1:
        _fail(f"num_runs={cfg.num_runs}: DAPS's repeated independent runs are particles here; "
              f"use num_samples={cfg.num_runs} (particles per measurement) with num_runs=1")
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 1:
        _fail(f"num_samples must be an integer >= 1, got {cfg.num_samples!r}")
    if cfg.batch_size != "auto" and (isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int)
                                     or cfg.batch_size < 1):
        _fail(f"batch_size (measurements per batch) must be auto or an integer >= 1, got {cfg.batch_size!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        _fail(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not isinstance(cfg.deterministic, bool):
        _fail(f"deterministic must be true or false, got {cfg.deterministic!r}")
    try:
        Precision.from_config(cfg)
    except ValueError as err:
        _fail(str(err))
    if cfg.threads != "auto" and (isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int)
                                  or cfg.threads < 1):
        _fail(f"threads must be auto or an integer >= 1, got {cfg.threads!r}")
    if isinstance(cfg.dist_timeout_min, bool) or not isinstance(cfg.dist_timeout_min, (int, float)) \
            or not cfg.dist_timeout_min > 0:
        _fail(f"dist_timeout_min (minutes a rank waits for the others) must be > 0, got {cfg.dist_timeout_min!r}")
    if str(cfg.get("tpu_cores", "auto")) not in ("auto", "1"):
        _fail(f"tpu_cores must be auto (every local TPU core) or 1, got {cfg.tpu_cores!r}")
    try:
        XlaOptions.from_config(cfg)
        sync_every_key(cfg, "cuda_sync_every", None)
    except ValueError as err:
        _fail(str(err))
    metrics = tuple(cfg.eval_fn_list)
    for m in metrics:
        if m not in METRICS:
            _fail(f"eval_fn_list: unknown metric {m!r} (known: {', '.join(METRICS)})")
    seeds = tuple(int(s) for s in cfg.seeds) if cfg.seeds is not None else (int(cfg.seed),)
    if len(set(seeds)) != len(seeds) or not seeds:
        _fail(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    if cfg.task_group not in cfg.task:
        _fail(f"task_group={cfg.task_group!r} is not in the task config (choose from "
              f"{', '.join(cfg.task.keys())})")

    group = cfg.task[cfg.task_group]
    mc = group.mcmc_sampler_config
    for sub in mc.keys():
        if sub not in MCMC_KEYS:
            _fail(f"unknown key task.{cfg.task_group}.mcmc_sampler_config.{sub}")
    try:
        mcmc = MCMCConfig(algo=mc.mc_algo, num_steps=int(mc.num_steps), lr=float(mc.lr),
                          tau=float(mc.tau), lr_min_ratio=float(mc.lr_min_ratio),
                          momentum=float(mc.get("momentum", 0.41)),
                          prior_solver=mc.get("prior_solver", "gaussian"),
                          grad_clamp=float(mc.get("grad_clamp", 1.0)))
    except ValueError as err:
        _fail(f"task.{cfg.task_group}.mcmc_sampler_config: {err}")
    op = group.operator
    if op.name != "phase_retrieval":
        _fail(f"task operator must be phase_retrieval, got {op.name!r}")
    operator = PhaseRetrieval(float(op.oversample), int(op.resolution), float(op.sigma))

    ann, dif = cfg.sampler.annealing_scheduler_config, cfg.sampler.diffusion_scheduler_config
    annealing = AnnealingConfig(int(ann.num_steps), float(ann.sigma_max), float(ann.sigma_min),
                                _poly(ann, "sampler.annealing_scheduler_config"))
    ode = ODEConfig(int(dif.num_steps), float(dif.sigma_min), _poly(dif, "sampler.diffusion_scheduler_config"))
    if annealing.num_steps < 1 or ode.num_steps < 1:
        _fail("sampler num_steps must be >= 1")
    if not annealing.sigma_max > annealing.sigma_min > 0:
        _fail(f"annealing needs sigma_max > sigma_min > 0, got {annealing.sigma_max}, {annealing.sigma_min}")

    thresholds = ModeThresholds(float(cfg.modes.min_psnr), float(cfg.modes.margin))
    check_flag_copies(cfg)
    search = SearchSettings.from_config(cfg.search, int(cfg.num_samples))
    algorithm, resample = _baseline(cfg, search)
    return Settings(annealing, ode, mcmc, operator, thresholds, seeds, metrics, search, algorithm, resample)


def _baseline(cfg: DictConfig, search: SearchSettings) -> tuple[str, ResampleConfig]:
    """``algorithm`` and the ``resample:`` block, checked whatever the algorithm (a bad value there
    is a mistake even when it is not used); ReSample runs no tree search."""
    algorithm = str(cfg.algorithm)
    if algorithm not in ALGORITHMS:
        _fail(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    try:
        resample = ResampleConfig.from_mapping(OmegaConf.to_container(cfg.resample, resolve=True))
    except ValueError as err:
        _fail(str(err))
    on = [flag for flag, part in (("repulsion_scale", search.repulsion), ("pruning_step", search.pruning),
                                  ("optimization_step", search.optimization)) if part is not None]
    if algorithm == "resample" and on:
        _fail(f"algorithm=resample runs no tree search: set {', '.join(on)} off "
              "(repulsion_scale=0, pruning_step=-1, optimization_step=-1)")
    return algorithm, resample


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
