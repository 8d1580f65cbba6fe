"""Diversity-aware pruning at the branching point: keep the best particle of each distinct mode.

Judged on each particle's estimates from the previous annealing step, decoded:

* loss L_i = ||A(D(z_i)) - y||^2 with z = z0hat (``criterion: z0hat``, default) or z0y; acceptable
  while L_i <= loss_factor * min_j L_j, hopeless beyond (the factor is fixed in config before any
  run). Why z0hat: it is the denoiser's on-manifold estimate, while z0y has been fitted to the data
  by the MCMC off the manifold. On the demo prior at the branching point (16 measurements, exp 1),
  z0hat's loss separated the particles that end in the true modes (16.8 - 17.8) from the ones
  that end in distractors (56 - 134) by 3x, while z0y's loss did not (11.1 - 12.3 vs 13.1 - 17.0).
* same mode, on decoded z0y downsampled to ``image_size`` (area average): i and j are the same
  solution when the plain distance ||x_i - x_j|| is not larger than the twin distance
  ||x_i - rot180(x_j)|| (twins are far apart as they are, but close once
  one is rotated; two particles of one mode are close as they are).

Greedy and deterministic, per measurement, visiting particles by increasing loss:
  1. keep a particle when it is acceptable and of a different mode than every particle kept so far
     ("best of its mode");
  2. fill up to ``num_keep`` with the remaining acceptable particles by loss ("fill by loss");
  3. still short: with ``replace_hopeless`` add copies of the kept particles (best first) under
     fresh ids with their own random streams ("copy of <id>"); otherwise keep fewer particles.
Everything not kept is dropped with its reason. With ``dry_run`` the decisions are recorded and
nothing is dropped, so a run without pruning can state its own pruning regret (the best final
particle among those pruning would have dropped). Otherwise pruning slices the particles object
(``Particles.select``): latents, generators, MCMC state, measurement copies all shrink, so the
rest of the run really costs less.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..device import Device
from ..modes import rot180
from ..models.base import LatentModel
from ..operators import PhaseRetrieval
from ..particles import Particles, Retired


@dataclass(frozen=True)
class PruningConfig:
    num_keep: int = 2
    loss_factor: float = 2.0
    replace_hopeless: bool = False
    image_size: int = 64
    criterion: str = "z0hat"        # whose measurement loss ranks the particles: z0hat | z0y
    dry_run: bool = False           # record the decisions only; every particle goes on

    def __post_init__(self):
        if int(self.num_keep) < 1:
            raise ValueError(f"search.pruning.num_keep must be >= 1, got {self.num_keep}")
        if not float(self.loss_factor) >= 1:
            raise ValueError(f"search.pruning.loss_factor must be >= 1, got {self.loss_factor}")
        if self.criterion not in ("z0hat", "z0y"):
            raise ValueError(f"search.pruning.criterion must be z0hat or z0y, got {self.criterion!r}")


def mode_distances(x: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, twin) distance matrices of decoded images: ||x_i - x_j||, ||x_i - rot180(x_j)||."""
    if x.shape[-1] > image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="area")
    flat, rot = x.flatten(1).double(), rot180(x).flatten(1).double()
    plain = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    twin = torch.cdist(flat, rot, compute_mode="donot_use_mm_for_euclid_dist")
    return plain, twin


def select(losses: list[float], plain: list[list[float]], twin: list[list[float]],
           cfg: PruningConfig, ids: list[int] | None = None) -> tuple[list[int], list[int], list[dict]]:
    """Greedy diversity-aware choice for one measurement (positions 0..n-1 of its particles).

    Returns (kept positions, positions to copy (parents), decisions: one dict per particle and copy,
    naming particles by ``ids`` (default: positions)).
    """
    n = len(losses)
    ids = list(range(n)) if ids is None else ids
    order = sorted(range(n), key=lambda i: (losses[i], i))
    best = losses[order[0]]
    acceptable = [losses[i] <= cfg.loss_factor * best for i in range(n)]
    same = lambda i, j: plain[i][j] <= twin[i][j]  # noqa: E731
    kept: list[int] = []
    reason: dict[int, str] = {}
    for i in order:                                            # 1. best of each distinct mode
        if len(kept) == cfg.num_keep:
            break
        if not acceptable[i]:
            continue
        twin_of = [k for k in kept if not same(i, k)]
        if len(twin_of) == len(kept):
            kept.append(i)
            reason[i] = "best of its mode" if not kept[:-1] else "different mode from " + \
                ", ".join(f"#{ids[k]}" for k in kept[:-1])
    for i in order:                                            # 2. fill by loss
        if len(kept) == cfg.num_keep:
            break
        if i not in kept and acceptable[i]:
            kept.append(i)
            reason[i] = "fill by loss (same mode as a kept particle)"
    copies: list[int] = []
    if cfg.replace_hopeless:                                   # 3. copies of good particles
        by_loss = sorted(kept, key=lambda i: losses[i])
        while len(kept) + len(copies) < cfg.num_keep:
            copies.append(by_loss[len(copies) % len(by_loss)])
    decisions = []
    for i in range(n):
        if i in kept:
            decisions.append(dict(position=i, id=ids[i], action="keep", reason=reason[i]))
        elif not acceptable[i]:
            decisions.append(dict(position=i, id=ids[i], action="drop",
                                  reason=f"hopeless: loss {losses[i]:.4g} > {cfg.loss_factor:g} x best {best:.4g}"))
        else:
            closest = min(kept, key=lambda k: plain[i][k]) if kept else None
            decisions.append(dict(position=i, id=ids[i], action="drop",
                                  reason=f"same mode as kept #{ids[closest]} with lower loss" if closest is not None
                                  else "not needed"))
    for parent in copies:
        decisions.append(dict(position=parent, id=ids[parent], action="copy",
                              reason=f"replaces a hopeless particle: copy of #{ids[parent]}"))
    return kept, copies, decisions


def make_prune_hook(model: LatentModel, operator: PhaseRetrieval, cfg: PruningConfig, device: Device):
    """``SearchHooks.prune``: (particles, step, z0y, z0hat) -> (survivors, retired, {m: record}).

    ``z0y`` / ``z0hat`` are the previous step's estimates of ``particles`` (the loop passes them)."""

    @torch.no_grad()
    def prune(particles: Particles, step: int, z0y: torch.Tensor, z0hat: torch.Tensor):
        x = model.decode(z0y)
        x_judged = x if cfg.criterion == "z0y" else model.decode(z0hat)
        losses = operator.loss(x_judged, particles.y).tolist()
        keep_positions: list[int] = []
        copy_parents: list[int] = []
        copy_ids: list[int] = []
        retired: list[Retired] = []
        records: dict[int, dict] = {}
        for m, positions in particles.groups().items():
            plain, twin = mode_distances(x[positions], cfg.image_size)
            group_losses = [losses[p] for p in positions]
            ids = [particles.ids[p] for p in positions]
            kept, copies, decisions = select(group_losses, plain.tolist(), twin.tolist(), cfg, ids)
            next_id = max(ids) + 1
            children = []
            for parent in copies:
                copy_parents.append(positions[parent])
                copy_ids.append(next_id)
                children.append(dict(parent=ids[parent], child=next_id))
                next_id += 1
            keep_positions += [positions[k] for k in kept]
            for d in decisions:
                del d["position"]
            for i, p in enumerate(positions):
                if i not in kept:
                    reason = next(d["reason"] for d in decisions if d["id"] == ids[i] and d["action"] == "drop")
                    retired.append(Retired(m, particles.image_index[p], particles.ids[p], "pruned", step,
                                           z0y[p].detach().cpu(), losses[p], reason))
            records[m] = dict(ids=ids, losses=group_losses, plain_distance=plain.tolist(),
                              twin_distance=twin.tolist(), kept=[ids[k] for k in kept], copies=children,
                              dropped=[ids[i] for i in range(len(ids)) if i not in kept],
                              decisions=decisions, loss_factor=cfg.loss_factor, num_keep=cfg.num_keep,
                              criterion=cfg.criterion, dry_run=cfg.dry_run)
        if cfg.dry_run:
            return particles, [], records
        survivors = particles.select(keep_positions)
        if copy_parents:
            survivors = Particles.concat([survivors, particles.copy_with_new_ids(copy_parents, copy_ids, device)])
        return survivors, retired, records

    return prune
