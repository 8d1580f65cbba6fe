"""A preset YAML is what its script runs: editing configs/experiment/<preset>.yaml changes the run.

Every script in commands_gpu/, in its print-only mode (``TREEDAPS_PRINT_ONLY=1``), passes its
settings only as ``experiment=<preset>`` (besides data, model, image range, name and save_dir), and
composing exactly the printed overrides yields the preset file's value for every key the file (or
a preset it builds on) sets.
"""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import REPO, compose_cfg

PRESETS = REPO / "configs" / "experiment"
RUN_ONLY = ("data=", "model=", "data.start_id=", "data.end_id=", "name=", "save_dir=")
SCRIPTS = [("exp0_baseline.sh", "--1"), ("exp0_baseline.sh", "--1 --hmc"), ("exp0_baseline.sh", "--1 --own-schedule"),
           ("exp1_repulsion.sh", "--1"), ("exp2_pruning.sh", "--1"), ("exp3_2particle.sh", "--10"),
           ("exp4_optimization.sh", "--1"), ("exp5_final.sh", "--10"), ("resample_baseline.sh", "--1")]


def _printed(script: str, flags: str) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "EXTRA_OVERRIDES"}
    res = subprocess.run(["bash", f"commands_gpu/{script}", *flags.split()], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**env, "TREEDAPS_PRINT_ONLY": "1"})
    assert res.returncode == 0, res.stderr
    return [shlex.split(line)[2:] for line in res.stdout.splitlines()]   # drop "python posterior_sample.py"


def _preset_values(name: str) -> DictConfig:
    """The preset file's own keys over those of the presets its defaults list names."""
    raw = OmegaConf.load(PRESETS / f"{name}.yaml")
    parents = [p for p in raw.pop("defaults", []) if p != "_self_"]
    return OmegaConf.merge(*(_preset_values(p) for p in parents), raw) if parents else raw


def _leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, DictConfig):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_every_script_is_covered():
    scripts = {p.name for p in (REPO / "commands_gpu").glob("*.sh")} - {"_common.sh"}
    assert scripts == {s for s, _ in SCRIPTS}


@pytest.mark.parametrize("script,flags", SCRIPTS)
def test_script_runs_its_preset_and_the_preset_file_decides(script, flags):
    commands = _printed(script, flags)
    assert commands
    for overrides in commands:
        presets = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
        others = [o for o in overrides if not o.startswith(("experiment=", *RUN_ONLY))]
        assert len(presets) == 1 and not others, overrides
        cfg = compose_cfg(*overrides)
        values = list(_leaves(_preset_values(presets[0])))
        assert values, presets[0]
        for key, value in values:
            assert OmegaConf.select(cfg, key) == value, f"{presets[0]}: {key}"


def test_an_edited_preset_changes_the_composed_run(tmp_path):
    """The check above is not vacuous: a copy of configs/ with exp2's pruning_step and its nested
    search.pruning.num_keep edited composes both."""
    from hydra import compose, initialize_config_dir
    import shutil
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    path = tmp_path / "configs" / "experiment" / "exp2.yaml"
    original = OmegaConf.select(OmegaConf.load(path), "pruning_step")
    path.write_text(path.read_text().replace(f"pruning_step: {original}", "pruning_step: 123")
                    .replace("    num_keep: 2", "    num_keep: 3"))
    with initialize_config_dir(config_dir=str(tmp_path / "configs"), version_base="1.3"):
        edited = compose(config_name="default", overrides=["experiment=exp2"])
    before = compose_cfg("experiment=exp2")
    assert edited.pruning_step == 123 != before.pruning_step == original
    assert edited.search.pruning.step == 123                    # the search block's copy follows
    assert edited.search.pruning.num_keep == 3 != before.search.pruning.num_keep == 2
