"""What a run records: one unit record per measurement (``unit``) and metrics.json (``merge``).

Pure functions over the sampler's output and telemetry (no model, no device, no files): the runner
measures, samples and scores, these build the dictionaries, ``treedaps.results`` writes them;
``volatile`` says which of their keys two runs with the same numbers may differ in.
Schema: docs/metrics.md.
"""
from .merge import (PHASES, SCHEMA_VERSION, VRAM_KEYS, UnitRecordError, dry_run_regret, gpu_peaks, merge,
                    optimization_rows, optimization_summary, phase_memory, phase_times, summarise_dry_run,
                    summarise_optimization, timed_with_compilation, unit_label)
from .unit import particle_rows, score_rows, unit_record, unit_tensors
from .volatile import volatile, without_volatile

__all__ = ["PHASES", "SCHEMA_VERSION", "VRAM_KEYS", "UnitRecordError", "dry_run_regret", "gpu_peaks", "merge",
           "optimization_rows", "optimization_summary", "particle_rows", "phase_memory", "phase_times",
           "score_rows", "summarise_dry_run", "summarise_optimization", "timed_with_compilation",
           "unit_label", "unit_record", "unit_tensors", "volatile", "without_volatile"]
