"""The run config's hash: which keys count, one spelling per value, older layouts.

Keys that do not change any measurement's numbers (the data range, the run name, bookkeeping) are
left out (``HASH_EXCLUDED``), so ``--1`` then ``--10`` extends the same run. Numbers count by value
(``0``, ``0.0`` and ``0.00`` are one value, as a script and the default write them), but a boolean
is never a number (``True`` != ``1``). A config of the layout before the ``search:`` block (issue 9)
hashes as today's layout of the same values, and the search block's keys are hashed under their
older names, so run folders written before it keep their hash, resume and merge.
"""
from __future__ import annotations

import hashlib
import json
import math

# Keys that select which measurements run or where/how results are written, not their numbers
# (``cuda_graphs`` replays the kernels that compile=static runs anyway).
# The search block's copies of the flat flags (search/settings.py FLAGS; validated equal) are
# counted once, as their flags.
HASH_EXCLUDED = ("data.start_id", "data.end_id", "name", "save_dir", "gpu", "save_samples",
                 "save_grids", "progress", "report", "threads", "dist_timeout_min", "search.branch_timestep",
                 "search.repulsion.scale", "search.pruning.step", "search.optimization.step",
                 "cuda_graphs")


SEARCH_PARTS = ("repulsion", "pruning", "optimization")      # top-level blocks before issue 9
_NESTED = tuple(f"search.{part}." for part in SEARCH_PARTS)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def canonical(value):
    """One spelling per value: an integral float is an int (0.0 -> 0, -0.0 -> 0), bools stay bools
    (True is not 1), containers recursively; anything else that is not JSON becomes its str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return str(value)


def nested_search(config: dict) -> dict:
    """A config written before the ``search:`` block (issue 9: top-level ``repulsion:``,
    ``pruning:``, ``optimization:``) in today's layout; any other config as it is."""
    if "search" in config or not set(SEARCH_PARTS) <= set(config):
        return config
    return {**{k: v for k, v in config.items() if k not in SEARCH_PARTS},
            "search": {k: config[k] for k in SEARCH_PARTS}}


def hashed_values(config: dict) -> dict:
    """The flattened, canonical values the hash covers (every key but ``HASH_EXCLUDED``), under
    today's names."""
    return {k: canonical(v) for k, v in flatten(nested_search(config)).items() if k not in HASH_EXCLUDED}


def config_hash(config: dict) -> str:
    """Hash of the resolved config's canonical values, without the keys in ``HASH_EXCLUDED``. The
    search block's keys are hashed under their names from before it (``repulsion.decay``, not
    ``search.repulsion.decay``): a folder written then keeps its hash, resumes and merges."""
    flat = {k.removeprefix("search.") if k.startswith(_NESTED) else k: v for k, v in hashed_values(config).items()}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) of every hashed key whose canonical value differs (an old
    layout of the same values is no difference)."""
    a, b = hashed_values(old), hashed_values(new)
    absent = "<absent>"
    same = lambda k: json.dumps(a.get(k, absent)) == json.dumps(b.get(k, absent))  # noqa: E731 - True != 1
    return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b)) if not same(k)]
