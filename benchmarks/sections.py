"""What the GPU scripts (gpu_check.py, speed.py, profile_step.py) share: guarded sections, the
closing table, and the networks they time.

Each section is a callable returning table rows [(what, result)]; a failing section is recorded
(its traceback in ``results["errors"]``) and the rest goes on; the JSON details are rewritten after
every section, so a run killed at its time limit still leaves what it measured.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures" / "daps_ref"


def full_model(name: str, dev, smoke: bool, mapping: str = "daps"):
    """The full-size ``name`` LDM of configs/model (``ffhq`` / ``imagenet``) with random weights
    (seed 0: the compute does not depend on the values), or with ``smoke`` the tiny fixture's
    architecture; on ``dev``, in eval mode."""
    from treedaps.models.ldm import CompVisLDM  # noqa: PLC0415 - the scripts put the repo on sys.path first
    path = SHARED / f"tiny_{name}_ldm.yaml" if smoke else ROOT / "configs" / "model" / f"{name}256ldm.yaml"
    cfg = OmegaConf.load(path)
    torch.manual_seed(0)
    model = CompVisLDM(OmegaConf.to_container(cfg.ldm_config, resolve=False), mapping, cfg.get("class_label"))
    return model.to(dev.torch_device).eval()


def run_sections(sections: list[tuple[str, Callable[[], list]]], only: list[str] | None, results: dict,
                 json_path: Path, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Run the sections named in ``only`` (all when None); append their rows; write ``json_path``."""
    results.setdefault("errors", {})
    for name, fn in sections:
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            rows += fn()
        except Exception as err:  # noqa: BLE001 - record and go on to the next section
            results["errors"][name] = traceback.format_exc()
            rows.append((name, f"FAILED: {type(err).__name__}: {err}"[:200]))
        results.setdefault("section_s", {})[name] = time.perf_counter() - t
        json_path.write_text(json.dumps(results, indent=1, default=str))
    return rows


def print_table(rows: list[tuple[str, str]], head: str) -> None:
    """The short Markdown table printed last."""
    width = max(len(r[0]) for r in rows)
    print(f"\n| {head} | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
