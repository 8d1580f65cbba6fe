"""metrics.json pieces (treedaps/record.py) and the report (treedaps/report/) on planted unit
records: missing values, malformed units, config hashes, fingerprint pairing, dry-run regret."""
import json
from pathlib import Path

import pytest

from treedaps.record import VRAM_KEYS, UnitRecordError, merge, optimization_summary, phase_memory, phase_times
from treedaps.report import commit_steps, full_report, main, mcnemar, paired, summary_table
from treedaps.results import atomic_write_json
from treedaps.plan import PhasePlan


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


def unit(index, psnrs, both=True, pruned=(), modes=None, trace=(), seed=42, **extra):
    """A valid unit record as the runner writes it (final particles 0..n-1, then pruned ones)."""
    modes = modes or ["0"] * len(psnrs)
    particles = [dict(id=i, status="final", psnr=p, loss=1.0, mode=modes[i]) for i, p in enumerate(psnrs)]
    particles += [dict(id=i, status="pruned", left_at_step=3) for i in pruned]
    record = dict(index=index, name=f"u{index}", seed=seed, unit=f"{index:05d}", particles=particles,
                  coverage=dict(found_truth="0" in modes, both_modes_covered=both, psnr_std=0.0,
                                mode_counts={m: modes.count(m) for m in ("0", "180", "other")}),
                  steps=steps([None] * 6), time=dict(total_s=6.0, phases=phase_times(steps([None] * 6))),
                  vram=dict.fromkeys(VRAM_KEYS), compute=dict(decoder=dict(calls=1, particle_evals=4,
                                                                           particle_evals_with_backward=4)),
                  events=[], trace=list(trace), resolved={}, unavailable={})
    record.update(extra)
    return record


def run_of(name, units, metrics=("psnr",)):
    """A run as report.load returns it: the merged metrics.json plus its unit records."""
    return dict(merge(units, dict(name=name, num_units=len(units), num_samples=4), metrics), _units=units)


def test_merge_daps_layout_and_best_of_n():
    merged = merge([unit(1, [20.0, 25.0]), unit(0, [10.0, 30.0, 20.0])], dict(name="x"), ("psnr",))
    assert [u["index"] for u in merged["units"]] == [0, 1]
    block = merged["psnr"]
    assert block["sample"] == [[10.0, 30.0, 20.0], [20.0, 25.0]]
    assert block["best"] == [30.0, 25.0] and block["max"] == [30.0, 25.0] and block["min"] == [10.0, 20.0]
    assert block["std"][0] == pytest.approx(10.0)                       # unbiased, as DAPS
    assert block["summary"]["best_of_n_mean"] == pytest.approx(27.5) and block["summary"]["best_of_n_n"] == 2
    assert merged["compute"]["total"]["decoder"]["particle_evals"] == 8
    assert merged["optimization"] is None and merged["diverged"] == [] and merged["dry_run_pruning"] is None


def optimize_event(step, **particle):
    row = dict(id=0, iterations=0, time_s=0.0, loss_before=None, loss_after=None, stop_reason="budget",
               decoder_forward_backward=0, skipped=False)
    row.update(particle)
    return dict(event="optimize", step=step, particles=[row])


def test_optimization_summary():
    u = unit(0, [20.0])
    u["events"] = [optimize_event(k, iterations=it, time_s=0.1, loss_before=0.003, loss_after=0.002,
                                  stop_reason=r, decoder_forward_backward=it + 1)
                   for k, it, r in ((4, 10, "noise"), (5, 500, "max_iters"))]
    s = optimization_summary([u])
    assert s["iterations_per_event"] == [10, 500] and s["iterations_per_particle_mean"] == 510
    assert s["stop_reasons"] == {"noise": 1, "max_iters": 1} and s["decoder_forward_backward"] == 512
    assert s["skipped"] == 0 and s["loss_before_n"] == 2


def test_skipped_optimisation_event_merges_and_reports():
    """The default preset: the budget is spent at the first event, the next one is skipped with
    null losses (this crashed merge() before)."""
    u = unit(0, [20.0])
    u["events"] = [optimize_event(32, iterations=600, time_s=1.5, loss_before=0.004, loss_after=0.001,
                                  stop_reason="max_iters", decoder_forward_backward=601),
                   optimize_event(41, skipped=True)]
    merged = merge([u], dict(name="opt"), ("psnr",))
    s = merged["optimization"]
    assert s["iterations_per_event"] == [600, 0] and s["skipped"] == 1 and s["skipped_reasons"] == {"budget": 1}
    assert s["loss_before_mean"] == pytest.approx(0.004) and s["loss_before_n"] == 1
    assert s["loss_after_mean"] == pytest.approx(0.001) and s["loss_after_n"] == 1
    only_skipped = merge([unit(0, [20.0], events=[optimize_event(41, skipped=True)])], {}, ("psnr",))
    assert only_skipped["optimization"]["loss_before_mean"] is None
    assert only_skipped["optimization"]["loss_before_n"] == 0
    text = full_report([dict(merged, _units=[u])])
    assert "| opt | 1 | ? | 20.00 ± 0.00 |" in text and "| 1/2 |" in text


def test_diverged_particle_with_null_metrics():
    u = unit(0, [20.0, 26.0])
    u["particles"].append(dict(id=2, status="diverged", left_at_step=7, loss=None, psnr=None, ssim=None,
                               reason="non-finite latent"))
    u["particles"][1]["ssim"] = None                  # a final particle whose SSIM could not be scored
    merged = merge([u], dict(name="div"), ("psnr", "ssim"))
    assert merged["diverged"] == [dict(index=0, seed=42, particle=2, step=7, reason="non-finite latent")]
    assert merged["psnr"]["sample"] == [[20.0, 26.0]] and merged["psnr"]["best"] == [26.0]
    assert merged["ssim"]["sample"] == [[None, None]] and merged["ssim"]["summary"]["best_of_n_n"] == 0
    row = summary_table([merged]).splitlines()[2]
    assert row.startswith("| div | 1 | ? | 26.00 ± 0.00 | n/a | n/a |")


def test_all_lpips_unavailable():
    units = [unit(i, [20.0, 22.0], unavailable={"lpips": "LPIPS weights not available offline"}) for i in range(2)]
    merged = merge(units, dict(name="off"), ("psnr", "lpips"))
    block = merged["lpips"]
    assert block["sample"] == [[None, None], [None, None]] and block["best"] == [None, None]
    assert block["summary"]["best_of_n_mean"] is None and block["summary"]["all_particles_n"] == 0
    assert block["unavailable"] == "LPIPS weights not available offline"
    assert "| off | 2 | 4 | 22.00 ± 0.00 | n/a | n/a |" in full_report([dict(merged, _units=units, metadata=dict(
        name="off", num_units=2, num_samples=4))])


def test_mean_over_fewer_units_says_so():
    units = [unit(0, [20.0]), unit(1, [None]), unit(2, [30.0])]
    merged = merge(units, dict(name="few"), ("psnr",))
    assert merged["psnr"]["summary"]["best_of_n_mean"] == pytest.approx(25.0)
    assert merged["psnr"]["summary"]["best_of_n_n"] == 2
    assert "25.00 ± 7.07 (n=2/3)" in summary_table([merged])


@pytest.mark.parametrize("breakage, words", [
    (lambda u: u.pop("steps"), "missing keys steps"),
    (lambda u: u.update(particles={"0": 1}), "particles (dict, expected list)"),
    (lambda u: u.update(particles=3), "particles (int, expected list)"),
    (lambda u: u["particles"][0].pop("status"), "without id/status"),
    (lambda u: u["steps"][2].pop("step"), "KeyError"),
    (lambda u: u.update(events=[dict(event="prune", step=3, dry_run=True)]), "KeyError: 'kept'"),
])
def test_malformed_unit_is_named(breakage, words):
    bad = unit(7, [20.0, 21.0])
    breakage(bad)
    with pytest.raises(UnitRecordError, match="00007") as err:
        merge([unit(0, [20.0]), bad], dict(name="x"), ("psnr",))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_config_hashes_refused_when_mixed():
    a, b = unit(0, [20.0], config_hash="aaaa"), unit(1, [20.0], config_hash="bbbb")
    with pytest.raises(UnitRecordError, match=r"another config than the run's \(aaaa\): 00001 \(bbbb\)$"):
        merge([a, b], dict(config_hash="aaaa"), ("psnr",))
    with pytest.raises(UnitRecordError, match="different configs: 00000 .aaaa., 00001 .bbbb."):
        merge([a, b], dict(), ("psnr",))
    merged = merge([a, unit(1, [20.0])], dict(config_hash="aaaa"), ("psnr",))
    assert merged["metadata"]["warnings"] == ["units without config_hash (older records, accepted unchecked): 00001"]
    assert "warnings" not in merge([a], dict(config_hash="aaaa"), ("psnr",))["metadata"]


def test_runner_merge_names_the_unit_and_keeps_metrics_json(tmp_path, monkeypatch):
    """A malformed or unreadable unit file: the runner's merge fails naming it; metrics.json and
    the units stay as they were; once the unit is fixed the merge replaces metrics.json."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from test_runner import make_cfg  # noqa: PLC0415
    from treedaps.runner import Experiment  # noqa: PLC0415

    exp = Experiment(make_cfg(tmp_path, "data.end_id=2", "num_samples=2"))
    seed = exp.settings.seeds[0]
    units = exp.run_dir.units
    good = [unit(i, [20.0 + i], seed=seed, config_hash=exp.config_hash) for i in range(2)]
    atomic_write_json(units / "00000.json", good[0])
    broken = dict(good[1])
    del broken["coverage"]
    atomic_write_json(units / "00001.json", broken)
    metrics = exp.run_dir.root / "metrics.json"
    metrics.write_text('{"old": true}')
    with pytest.raises(UnitRecordError, match="unit 00001: missing keys coverage"):
        exp.merge()
    (units / "00001.json").write_text('{"index": 1, "se')                  # a partial file
    with pytest.raises(ValueError, match="unit file .*00001.json is not valid JSON"):
        exp.merge()
    assert metrics.read_text() == '{"old": true}' and sorted(p.name for p in units.iterdir()) == [
        "00000.json", "00001.json"]
    atomic_write_json(units / "00001.json", good[1])
    merged = exp.merge()
    assert json.loads(metrics.read_text())["psnr"]["best"] == [20.0, 21.0] == merged["psnr"]["best"]


def test_commit_steps_are_the_first_step_of_the_final_label():
    trace = [dict(step=k, ids=[0, 1], mode_z0hat=[a, b]) for k, (a, b) in
             enumerate([("other", "0"), ("180", "0"), ("0", "180"), ("0", "180"), ("0", "180")])]
    u = unit(0, [20.0, 10.0], modes=["0", "180"], trace=trace)
    assert commit_steps(u) == {0: 2, 1: 2}
    assert commit_steps(unit(0, [20.0, 10.0], trace=())) == {0: None, 1: None}


def test_report_tables_without_traces_or_optional_blocks():
    u = unit(0, [20.0, 25.0])
    del u["trace"], u["resolved"], u["unavailable"]
    merged = merge([u], dict(name="bare", gpu=None), ("psnr",))
    merged["timing"]["per_step_mean_s"] = [None, 0.5]
    for key in ("modes", "vram", "compute", "optimization"):
        merged[key] = None
    text = full_report([dict(merged, _units=[u])])
    assert "| bare | 1 | ? | 25.00 ± 0.00 |" in text and "| 500.0 | n/a | n/a |" in text
    assert "| bare | 1 | 0 / 0 / 0 | n/a | n/a | n/a | n/a | n/a | n/a |" in text


def test_mcnemar_exact():
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(0, 2) == pytest.approx(0.5)
    assert mcnemar(1, 3) == pytest.approx(0.625)
    assert mcnemar(0, 6) == pytest.approx(2 / 64)


# -- fingerprint pairing ---------------------------------------------------------------------------------
def traced(ids_per_step, salt_from=None, salt_particle=None):
    """Trace entries with one 16-hex fingerprint per particle; from step ``salt_from`` on, the
    fingerprint of ``salt_particle`` differs from the unsalted run's."""
    out = []
    for step, ids in enumerate(ids_per_step):
        fps = [f"{step:04x}{pid:04x}" + ("ffffffff" if salt_from is not None and step >= salt_from
                                           and pid == salt_particle else "00000000") for pid in ids]
        out.append(dict(step=step, ids=list(ids), mean_pairwise_z0y=1.0, fingerprint_z0y=fps))
    return out


def pair_runs(prune_step=3, differ_from=4, fingerprinted=True):
    """A: 4 particles, no pruning; B: the same measurements pruned at ``prune_step`` to ids 0 and 2,
    with B's particle 2 differing from ``differ_from`` on. A's best particle is 1 in unit 0 (pruned
    in B) and 0 in unit 1 (kept)."""
    full = [[0, 1, 2, 3]] * 6
    kept = [[0, 1, 2, 3] if k < prune_step else [0, 2] for k in range(6)]
    ta = traced(full) if fingerprinted else []
    tb = traced(kept, differ_from, 2) if fingerprinted else []
    event = dict(event="prune", step=prune_step, ids=[0, 1, 2, 3], kept=[0, 2], dropped=[1, 3])
    a = [unit(0, [20.0, 30.0, 10.0, 15.0], trace=ta), unit(1, [30.0, 20.0, 10.0, 15.0], trace=ta)]
    b = [unit(i, [25.0, 12.0], pruned=[1, 3], trace=tb, events=[event]) for i in range(2)]
    for u in b:
        for p in u["particles"]:
            p["left_at_step"] = prune_step if p["status"] == "pruned" else None
    return run_of("A", a), run_of("B", b)


def test_pairing_identical_through_step_3_covers_a_prune_at_4():
    """A pruning at the start of step 4 judges step 3's estimates: identity through 3 suffices (at
    step 4 B already runs 2 particles, whose rounding may differ on a real network)."""
    text = paired(*pair_runs(prune_step=4, differ_from=4))
    assert "paired over 2 measurements (image, seed): bitwise-paired up to step 3 " \
           "(first difference at step 4, particle 2, unit 00000)" in text
    assert "pruning regret (oracle-best particle of A pruned in B): 1/2 = 0.50" in text


def test_pairing_that_ends_before_the_judged_step_gives_no_regret():
    text = paired(*pair_runs(prune_step=5, differ_from=4))
    assert "bitwise-paired up to step 3" in text and "pruning regret (" not in text
    assert ("pruning regret not computed: B prunes at the start of step 5, pairing: bitwise-paired up to "
            "step 3") in text and "identical through step 4" in text


def test_pairing_stream_only_and_no_fingerprints():
    text = paired(*pair_runs(prune_step=3, differ_from=0))
    assert "stream-paired only (first difference at step 0, particle 2, unit 00000)" in text
    assert "pruning regret not computed" in text
    text = paired(*pair_runs(fingerprinted=False))
    assert "no fingerprints (older run): A has none for unit 00000 (2 of 2 units)" in text
    assert "pruning regret not computed" in text


def test_pairing_identical_everywhere_and_success_tables():
    a, b = pair_runs(prune_step=3, differ_from=99)
    b["_units"][1]["coverage"]["both_modes_covered"] = False
    text = paired(a, b)
    assert "bitwise-paired up to step 5 (every recorded step)" in text
    assert "success = found_truth over 2 measurements" in text and "| A success | 2 | 0 |" in text
    assert "success = both_modes_covered over 2 measurements" in text and "| A success | 1 | 1 |" in text


# -- dry-run pruning regret ------------------------------------------------------------------------------
def dry_run_units():
    """Unit 0: PSNRs [20, 25, 18, 24], kept [0, 3] -> regret 25 - 24 = 1.0 dB, and the only 0° particle
    (id 1) was not kept. Unit 1: the best (id 0, 0°) is kept -> 0 dB, nothing lost."""
    event = dict(event="prune", step=3, dry_run=True, ids=[0, 1, 2, 3], losses=[1.0] * 4, dropped=[1, 2],
                 decisions=[])
    u0 = unit(0, [20.0, 25.0, 18.0, 24.0], modes=["other", "0", "other", "180"], events=[dict(event, kept=[0, 3])])
    u1 = unit(1, [26.0, 25.0, 18.0, 24.0], modes=["0", "0", "other", "180"], events=[dict(event, kept=[0, 3])])
    return [u0, u1]


def test_dry_run_pruning_regret_by_hand():
    merged = merge(dry_run_units(), dict(name="dry"), ("psnr",))
    d = merged["dry_run_pruning"]
    assert [u["regret_db"] for u in d["per_unit"]] == [1.0, 0.0]
    assert [u["lost_truth"] for u in d["per_unit"]] == [True, False]
    assert (d["units"], d["regret_db_mean"], d["regret_db_max"], d["regret_positive_share"]) == (2, 0.5, 1.0, 0.5)
    assert d["lost_truth_share"] == 0.5 and d["lost_truth_n"] == 2
    text = full_report([dict(merged, _units=dry_run_units())])
    assert "## Dry-run pruning regret" in text and "| dry | 2 | 3 | 0.50 | 1.00 | 0.50 | 0.50 |" in text


def test_dry_run_with_a_diverged_kept_particle_and_no_dry_run():
    u = dry_run_units()[0]
    u["events"][0]["kept"] = [4]                          # kept a particle that later diverged
    u["particles"].append(dict(id=4, status="diverged", left_at_step=5, psnr=None))
    d = merge([u], {}, ("psnr",))["dry_run_pruning"]
    assert d["per_unit"][0]["regret_db"] is None and d["per_unit"][0]["reason"] == "no kept particle has a final PSNR"
    assert d["regret_db_mean"] is None and d["regret_n"] == 0 and d["per_unit"][0]["lost_truth"] is True
    # a dry-run prune event is not a real one: a paired comparison computes no regret from it
    a, b = run_of("A", dry_run_units()), run_of("B", dry_run_units())
    assert "pruning regret" not in paired(a, b)


def write_run(folder: Path, name: str, units: list[dict]) -> Path:
    (folder / "units").mkdir(parents=True)
    for u in units:
        (folder / "units" / f"{u['unit']}.json").write_text(json.dumps(u))
    (folder / "metrics.json").write_text(json.dumps(merge(units, dict(name=name, num_samples=4), ("psnr",))))
    return folder


def test_report_cli(tmp_path, capsys):
    run = write_run(tmp_path / "run", "run", [unit(0, [20.0, 25.0])])
    assert main([str(run), "--out", str(tmp_path / "r.md")]) == 0
    out = capsys.readouterr().out
    assert "| run | 1 | 4 | 25.00 ± 0.00 |" in out and (tmp_path / "r.md").read_text().startswith("## Quality")
    assert main([str(tmp_path / "missing")]) == 2
    (run / "units" / "00000.json").write_text("{")
    assert main([str(run)]) == 2 and "00000.json is not valid JSON" in capsys.readouterr().err


def test_report_cli_pair(tmp_path, capsys):
    a, b = pair_runs(prune_step=3, differ_from=4)
    pa = write_run(tmp_path / "a", "A", a["_units"])
    pb = write_run(tmp_path / "b", "B", b["_units"])
    assert main([str(pa), str(pb), "--pair", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert "## A vs B" in out and "bitwise-paired up to step 3" in out and "1/2 = 0.50" in out
    assert main([str(pa), "--pair", str(pa), str(pb)]) == 2
    assert "--pair names must be among the given paths" in capsys.readouterr().err
