"""Filling the GPU: ``batch_size=auto`` and the images-per-GPU-hour figure of metrics.json.

``batch_size`` counts measurements; each brings ``num_samples`` particles. ``auto`` measures, on
CUDA, the memory one measurement needs with a probe: one decode + phase-retrieval loss + backward
(an MCMC data-gradient step, the largest working set of the loop; latent optimisation iterations
are the same pass) and one denoiser call, at the particle count, with the run's precision wrappers
in place. It then takes as many measurements as fit ``headroom`` of the free memory (the caching
allocator's reserved-but-unused bytes count as free). With ``cuda_graphs`` each measurement counts
twice: the graphs keep a memory pool of their own beside the allocator's (on an H200 an auto batch
sized on the single count ran out of memory while capturing its graph, with 62 of 140 GB reserved
but unusable; docs/benchmarks.md). Per-measurement pruning and optimisation are unchanged by the
batch: they slice per measurement. On the CPU and XLA ``auto`` is 1.
"""
from __future__ import annotations

import logging

import torch

from .device import Device
from .mcmc import latent_data_gradient
from .models.base import LatentModel
from .operators import PhaseRetrieval

log = logging.getLogger("treedaps")
HEADROOM = 0.8      # share of the free memory the batch may use (fragmentation, telemetry decodes)


def probe_memory_mb(model: LatentModel, operator: PhaseRetrieval, device: Device, particles: int) -> float:
    """Peak memory above the current allocation (MB) of one data-gradient step and one denoiser
    call on ``particles`` latents (CUDA only)."""
    dev = device.torch_device
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    z = torch.randn(particles, *model.latent_shape, device=dev)
    with torch.no_grad():
        y = operator(model.decode(z))
    latent_data_gradient(model.decode, operator.loss, y)(z)
    with torch.no_grad():
        model.denoise(z, torch.tensor(1.0, device=dev))
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2.0 ** 20


def auto_batch_size(model: LatentModel, operator: PhaseRetrieval, device: Device, particles: int,
                    most: int, headroom: float = HEADROOM, cuda_graphs: bool = False) -> tuple[int, dict]:
    """(measurements per batch, what was measured) for ``batch_size=auto``; at most ``most``."""
    if device.kind != "cuda":
        return 1, dict(reason=f"batch_size=auto on {device.kind}: 1")
    probed = probe_memory_mb(model, operator, device, particles)
    per = probed * (2 if cuda_graphs else 1)
    free, _ = torch.cuda.mem_get_info(device.torch_device)
    cached = torch.cuda.memory_reserved(device.torch_device) - torch.cuda.memory_allocated(device.torch_device)
    free_mb = (free + cached) / 2.0 ** 20
    n = max(1, min(int(most), int(headroom * free_mb // max(per, 1e-6))))
    info = dict(probe_mb_per_measurement=probed, counted_mb_per_measurement=per, cuda_graphs=cuda_graphs,
                free_mb=free_mb, headroom=headroom, chosen=n, most=int(most))
    log.info("batch_size=auto: %.0f MB per measurement (%d particles), %.0f MB free -> %d measurements per "
             "batch", per, particles, free_mb, n)
    return n, info


def images_per_gpu_hour(measurements: int, gpu_seconds: float) -> float | None:
    """Measurements finished per GPU-hour: total measurements / total GPU-seconds x 3600."""
    return measurements / gpu_seconds * 3600 if gpu_seconds > 0 else None
