"""What may differ between two runs that computed the same numbers: time, memory, the host, the
date, the revision and the config hash (which hashes the config's key names, so a refactor that
renames a key changes it). ``volatile(key)`` names such a key of metrics.json or a unit record;
``without_volatile(record)`` drops them everywhere. "The same numbers" means equal after it
(``benchmarks/compare_runs.py``, ``tests/test_real_path.py``)."""
from __future__ import annotations

VOLATILE = frozenset({"written", "git_revision", "config_hash", "device", "host", "hostname", "date", "gpu",
                      "peak_reserved_mb", "weights_mb", "vram", "wall_s", "iteration_s", "time_s", "total_s",
                      "time", "phases", "step_times", "timing"})
VOLATILE_SUFFIXES = ("_s", "_mb", "_time", "_seconds")


def volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith(VOLATILE_SUFFIXES)


def without_volatile(record):
    """``record`` (dicts and lists, as JSON gives them) without its volatile keys, at every depth."""
    if isinstance(record, dict):
        return {k: without_volatile(v) for k, v in record.items() if not volatile(k)}
    if isinstance(record, list):
        return [without_volatile(v) for v in record]
    return record
