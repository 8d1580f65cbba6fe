"""metrics.json pieces (treedaps/record.py) and the report (treedaps/report.py) on planted inputs."""
import json

import pytest

from treedaps.record import VRAM_KEYS, merge, optimization_summary, phase_memory, phase_times
from treedaps.report import commit_steps, main, mcnemar, paired
from treedaps.sampler import PhasePlan


def steps(peaks: list[float | None]) -> list[dict]:
    return [dict(step=k, peak_mb=p, time_s=1.0, prune_s=0.0, optimize_s=0.0,
                 phase="explore" if k < 3 else "refine") for k, p in enumerate(peaks)]


def test_phase_memory_segments():
    peaks = [10, 12, 11, 6, 7, 9]
    assert phase_memory(steps(peaks), PhasePlan(6, 3)) == dict.fromkeys(VRAM_KEYS)
    m = phase_memory(steps(peaks), PhasePlan(6, 3, prune_step=3))
    assert m["pre_pruning_peak_mb"] == 12 and m["post_pruning_peak_mb"] == 9
    assert m["pre_optimization_peak_mb"] is None and m["optimization_peak_mb"] is None
    m = phase_memory(steps(peaks), PhasePlan(6, 3, prune_step=3, optimize_steps=frozenset({4, 5})))
    assert (m["pre_pruning_peak_mb"], m["post_pruning_peak_mb"], m["pre_optimization_peak_mb"],
            m["optimization_peak_mb"], m["post_pruning_pre_optimization_peak_mb"]) == (12, 9, 12, 9, 6)
    m = phase_memory(steps(peaks), PhasePlan(6, 3, prune_step=3, optimize_steps=frozenset({3, 5})))
    assert m["post_pruning_pre_optimization_peak_mb"] is None   # they start at the same step
    assert phase_memory(steps([None] * 6), PhasePlan(6, 3, prune_step=3))["pre_pruning_peak_mb"] is None
    judged = steps(peaks)
    judged[3]["prune_peak_mb"] = 15      # the pruning itself, measured before the counter reset
    m = phase_memory(judged, PhasePlan(6, 3, prune_step=3))
    assert m["pre_pruning_peak_mb"] == 15 and m["post_pruning_peak_mb"] == 9


def test_phase_times_split_the_search_work_out():
    s = steps([None] * 6)
    s[3].update(prune_s=0.25)
    s[4].update(optimize_s=0.5)
    assert phase_times(s) == dict(explore=3.0, prune=0.25, refine=2.25, optimize=0.5)


def unit(index, psnrs, both=True, pruned=(), modes=None, trace=()):
    particles = [dict(id=i, status="final", psnr=p, loss=1.0, mode=(modes or ["0"] * len(psnrs))[i])
                 for i, p in enumerate(psnrs)]
    particles += [dict(id=i, status="pruned", left_at_step=3) for i in pruned]
    return dict(index=index, name=f"u{index}", seed=42, particles=particles,
                coverage=dict(found_truth=True, both_modes_covered=both, psnr_std=0.0,
                              mode_counts={"0": 1, "180": 1, "other": 0}),
                steps=steps([None] * 6), time=dict(total_s=6.0, phases=phase_times(steps([None] * 6))),
                vram=dict.fromkeys(VRAM_KEYS), compute=dict(decoder=dict(calls=1, particle_evals=4,
                                                                         particle_evals_with_backward=4)),
                events=[], trace=list(trace))


def test_merge_daps_layout_and_best_of_n():
    merged = merge([unit(1, [20.0, 25.0]), unit(0, [10.0, 30.0, 20.0])], dict(name="x"), ("psnr",))
    assert [u["index"] for u in merged["units"]] == [0, 1]
    block = merged["psnr"]
    assert block["sample"] == [[10.0, 30.0, 20.0], [20.0, 25.0]]
    assert block["best"] == [30.0, 25.0] and block["max"] == [30.0, 25.0] and block["min"] == [10.0, 20.0]
    assert block["std"][0] == pytest.approx(10.0)                       # unbiased, as DAPS
    assert block["summary"]["best_of_n_mean"] == pytest.approx(27.5)
    assert merged["compute"]["total"]["decoder"]["particle_evals"] == 8
    assert merged["optimization"] is None and merged["diverged"] == []


def test_optimization_summary():
    u = unit(0, [20.0])
    u["events"] = [dict(event="optimize", step=k, particles=[
        dict(id=0, iterations=it, time_s=0.1, loss_before=0.003, loss_after=0.002, stop_reason=r,
             decoder_forward_backward=it + 1)]) for k, it, r in ((4, 10, "noise"), (5, 500, "max_iters"))]
    s = optimization_summary([u])
    assert s["iterations_per_event"] == [10, 500] and s["iterations_per_particle_mean"] == 510
    assert s["stop_reasons"] == {"noise": 1, "max_iters": 1} and s["decoder_forward_backward"] == 512


def test_commit_steps_are_the_first_step_of_the_final_label():
    trace = [dict(step=k, ids=[0, 1], mode_z0hat=[a, b]) for k, (a, b) in
             enumerate([("other", "0"), ("180", "0"), ("0", "180"), ("0", "180"), ("0", "180")])]
    u = unit(0, [20.0, 10.0], modes=["0", "180"], trace=trace)
    assert commit_steps(u) == {0: 2, 1: 2}


def test_mcnemar_exact():
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(0, 2) == pytest.approx(0.5)
    assert mcnemar(1, 3) == pytest.approx(0.625)
    assert mcnemar(0, 6) == pytest.approx(2 / 64)


def test_paired_table_and_regret():
    a = dict(metadata=dict(name="A"), _units=[unit(0, [30.0, 10.0], both=True), unit(1, [30.0, 10.0], both=False)])
    b = dict(metadata=dict(name="B"), _units=[unit(0, [10.0], both=False, pruned=[0]), unit(1, [10.0], both=True, pruned=[1])])
    text = paired(a, b, "both_modes_covered")
    assert "| A success | 0 | 1 |" in text and "| A failure | 1 | 0 |" in text
    assert "pruning regret (oracle-best particle of A pruned in B): 1/2 = 0.50" in text


def test_report_cli(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "units").mkdir(parents=True)
    u = unit(0, [20.0, 25.0])
    u["resolved"] = {}
    (run / "units" / "00000.json").write_text(json.dumps(u))
    metadata = dict(name="run", num_units=1, num_samples=2, gpu=dict(peak_vram_mb=None))
    (run / "metrics.json").write_text(json.dumps(merge([u], metadata, ("psnr",))))
    assert main([str(run), "--out", str(tmp_path / "r.md")]) == 0
    out = capsys.readouterr().out
    assert "| run | 1 | 2 | 25.00 ± 0.00 |" in out and (tmp_path / "r.md").read_text().startswith("## Quality")
    assert main([str(tmp_path / "missing")]) == 2
