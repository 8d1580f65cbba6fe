"""docs/config.md and the config files cannot drift apart, and the allowed keys are the modules'.

Every key of every composed config (the default with each model and each data option) is named in
docs/config.md's "Keys" table, every key named there exists in one of them, and the search blocks'
allowed keys are exactly the fields of the dataclasses in treedaps/search/ (and the resample
block's those of ``ResampleConfig``), with the mission's flat flags copied into the search block.
"""
from __future__ import annotations

import re
from dataclasses import fields

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import REPO, compose_cfg
from treedaps.baselines.settings import ResampleConfig
from treedaps.config import SCHEMA, ConfigError, validate
from treedaps.hashing import HASH_EXCLUDED
from treedaps.search.consistency import OptimizationConfig
from treedaps.search.pruning import PruningConfig
from treedaps.search.settings import FLAGS, RepulsionConfig

OPAQUE = ("model.ldm_config",)   # the checkpoint's architecture yaml: one documented key


def _leaves(node: DictConfig, prefix: str = ""):
    for k in node.keys():
        key = f"{prefix}{k}"
        value = node._get_node(k)
        if isinstance(value, DictConfig) and key not in OPAQUE:
            yield from _leaves(value, key + ".")
        else:
            yield key


def _config_keys() -> set[str]:
    keys: set[str] = set()
    for group in ("model", "data"):
        for option in sorted((REPO / "configs" / group).glob("*.yaml")):
            keys |= set(_leaves(compose_cfg(f"{group}={option.stem}")))
    return keys


def _documented() -> set[str]:
    text = (REPO / "docs" / "config.md").read_text()
    table = text[text.index("## Keys"):]
    names = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def _expand(name: str, task_groups) -> set[str]:
    return {name.replace("<group>", g) for g in task_groups} if "<group>" in name else {name}


def test_every_config_key_is_documented_and_every_documented_key_exists():
    keys = _config_keys()
    groups = {k.split(".")[1] for k in keys if k.startswith("task.")}
    documented = set().union(*(_expand(n, groups) for n in _documented()))
    assert "search.optimization.final_reserve" in keys and "task.ldm_hmc.mcmc_sampler_config.momentum" in keys
    missing = sorted(keys - documented)
    assert not missing, f"keys not in docs/config.md: {missing}"
    # a <group> row need only exist for one task group (momentum is HMC's)
    stale = sorted(n for n in _documented() if not _expand(n, groups) & keys)
    assert not stale, f"docs/config.md names keys no config has: {stale}"


def test_search_blocks_allow_exactly_their_dataclass_fields():
    names = lambda cls: {f.name for f in fields(cls)}
    search = SCHEMA["search"]
    assert set(search) == {"branch_timestep", "repulsion", "pruning", "optimization"}   # treedaps/search/
    assert search["repulsion"] == names(RepulsionConfig)                   # scale: repulsion_scale's copy
    assert search["pruning"] == names(PruningConfig) | {"step"}            # step: pruning_step's copy
    assert search["optimization"] == names(OptimizationConfig) | {"step", "preset"}
    assert SCHEMA["resample"] == names(ResampleConfig)
    # and the composed default has every one of them (a field without a yaml key is undocumented)
    cfg = compose_cfg()
    for block in ("repulsion", "pruning", "optimization"):
        assert set(cfg.search[block].keys()) == search[block], block
    for block in ("resample", "modes", "telemetry"):
        assert set(cfg[block].keys()) == SCHEMA[block], block


def test_search_block_copies_the_flat_flags():
    """The mission's flags stay the keys to set: the search block holds ``${flag}``, and setting the
    flag moves the copy (setting the copy alone is refused: test_runner's BAD)."""
    cfg = compose_cfg()
    for path, flag in FLAGS.items():
        parent, leaf = f"search.{path}".rsplit(".", 1)
        assert OmegaConf.is_interpolation(OmegaConf.select(cfg, parent), leaf), path
        assert OmegaConf.select(cfg, parent)._get_node(leaf)._value() == f"${{{flag}}}", path
    assert {f"search.{path}" for path in FLAGS} <= set(HASH_EXCLUDED)     # hashed once, as the flags
    moved = compose_cfg("repulsion_scale=0.3", "pruning_step=150", "optimization_step=100", "branch_timestep=300")
    assert [OmegaConf.select(moved, f"search.{p}") for p in FLAGS] == [300, 0.3, 150, 100]


@pytest.mark.parametrize("override", ["+search.pruning.nope=1", "+search.optimization.lr_typo=1",
                                      "+search.nope=1", "+resample.gama=40", "+repulsion.scale=1",
                                      "+task.ldm.mcmc_sampler_config.algo=hmc"])
def test_unknown_block_key_is_refused_with_its_name(override):
    cfg = compose_cfg(override)
    key = override[1:].split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(cfg)
